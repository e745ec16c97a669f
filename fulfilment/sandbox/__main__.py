"""``python -m fulfilment.sandbox``: the ``sandbox`` command without the main CLI."""

from fulfilment.sandbox.command import sandbox

if __name__ == "__main__":
    sandbox(prog_name="python -m fulfilment.sandbox")
