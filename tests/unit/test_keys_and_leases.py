"""The key space no reference can reach, and the short lease renewed while work runs."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from fulfilment.harness.processes import wait_for
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from tests.conftest import LedgerStore

ALPHABET = string.ascii_letters + string.digits + "._:-"
#: References spelled like the keys we own, and like other intents' keys.
KEY_LIKE = ["open", "ledger", "ledger:open", "lease", "intake", "intake:processing",
            "intake:lock", "sweep:lock", "broker", "onebox:token", "a:lease", "x:ledger",
            "fulfilment:ledger:open", "{x}", "fulfilment.results", "batch", "batch:open",
            "batch:members", "x:batch", "b1", "ledger:batch"]
references = st.one_of(st.text(ALPHABET, min_size=1, max_size=64),
                       st.sampled_from([k for k in KEY_LIKE if "{" not in k]))
prefixes = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=16)


def fixed_keys(keys: Keys) -> set[str]:
    """Every key of ours that belongs to no single intent."""
    return {keys.open_intents, keys.intake, keys.intake_processing, keys.intake_lock,
            keys.sweep_lock, f"{keys.prefix}:onebox:token:0123456789abcdef",
            f"{keys.prefix}:broker:{keys.task_queue}", f"{keys.prefix}:broker:unacked"}


@given(prefixes, references, references)
def test_no_reference_reaches_a_key_of_ours_or_of_another_intent(
        prefix: str, first: str, second: str) -> None:
    keys = Keys(prefix)
    mine = {keys.ledger(first), keys.lease(first)}
    assert len(mine) == 2
    assert not mine & fixed_keys(keys)
    if first != second:
        assert not mine & {keys.ledger(second), keys.lease(second)}


def batch_keys(keys: Keys, batch: str) -> set[str]:
    return {keys.batch(batch), keys.batch_open(batch), keys.batch_members(batch)}


@given(prefixes, references, references, references)
def test_no_batch_id_reaches_a_key_of_an_intent_of_ours_or_of_another_batch(
        prefix: str, batch: str, reference: str, other: str) -> None:
    # A batch id is spelled by the rule of a reference; it may even equal one
    keys = Keys(prefix)
    mine = batch_keys(keys, batch)
    assert len(mine) == 3
    assert not mine & fixed_keys(keys)
    for ref in (reference, batch):
        assert not mine & {keys.ledger(ref), keys.lease(ref)}
    if other != batch:
        assert not mine & batch_keys(keys, other)
    for key in mine:
        assert key[key.index("{") + 1:key.index("}")] == batch


@given(prefixes, references)
def test_every_key_of_an_intent_shares_its_hash_tag(prefix: str, reference: str) -> None:
    keys = Keys(prefix)
    for key in (keys.ledger(reference), keys.lease(reference)):
        assert key[key.index("{") + 1:key.index("}")] == reference


def test_a_lease_is_renewed_while_held_and_lapses_when_its_holder_dies(
        ledger_store: LedgerStore) -> None:
    leases = Leases(ledger_store.client, Keys(ledger_store.prefix), ttl=0.3)
    # While held, the heartbeat keeps it past its time to live
    with leases.take("shop-1") as held:  # type: ignore[union-attr]
        wait_for(lambda: held.renewals >= 3, timeout=10, what="three renewals")
        assert leases.take("shop-1") is None
    assert leases.take("shop-1") is not None  # released on exit
    # A holder that dies (no heartbeat, no release) frees it within its time to live
    wait_for(lambda: leases.take("shop-1"), timeout=10, what="the dead holder's lease to lapse")


def test_a_lease_held_past_its_longest_hold_is_no_longer_renewed(
        ledger_store: LedgerStore) -> None:
    # A hung task thread (no time limit reaches it under the threads pool) keeps its
    # heartbeat alive: past max_hold, the heartbeat lets the lease lapse all the same.
    leases = Leases(ledger_store.client, Keys(ledger_store.prefix), ttl=0.3, max_hold=0.5)
    with leases.take("shop-1") as held:  # type: ignore[union-attr]
        wait_for(lambda: leases.take("shop-1"), timeout=10, what="the lease to lapse")
        assert held.renewals <= 0.5 / (0.3 / 3) + 1


def test_a_stale_holder_neither_renews_nor_releases_the_new_holders_lease(
        ledger_store: LedgerStore) -> None:
    # Given a holder whose lease lapsed (it stalled) and another worker holding it now
    leases = Leases(ledger_store.client, Keys(ledger_store.prefix), ttl=60)
    stale = leases.take("shop-1")
    assert stale is not None
    ledger_store.client.delete(stale.key)
    fresh = leases.take("shop-1")
    assert fresh is not None
    # When the stale one wakes up, renews and lets go
    assert stale.renew() is False
    stale.release()
    # Then the new holder's lease stands, and it still renews it
    assert leases.take("shop-1") is None
    assert fresh.renew() is True
