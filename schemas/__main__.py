"""``python -m schemas``: rewrite the JSON Schema files from the marshmallow schemas.

``--check`` writes nothing and exits 1 when the committed files are stale (for CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from schemas.jsonschema import JSON_DIRECTORY, json_schema_texts, write_json_schemas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas", description=__doc__)
    parser.add_argument("--directory", type=Path, default=JSON_DIRECTORY,
                        help="where the files go (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if args.check:
        stale = [name for name, text in json_schema_texts().items()
                 if not (directory / name).is_file()
                 or (directory / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"stale: {directory / name} (run `python -m schemas`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_json_schemas(directory):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
