"""Claims: who is generating a cache key right now, across every process sharing the store.

A claim is a row per key, taken atomically (`INSERT ... ON CONFLICT ... DO UPDATE ... WHERE
expired RETURNING`), held for a lease the owner renews, and named by a fencing token that
grows by one with every new holder. Whatever an owner publishes (the cache entry, its ledger
row) is written in one transaction that first checks the token is still its own: an owner
that stalled past its lease and was replaced cannot publish or bill, however late it wakes.

Rows stay after release (expires = 0), so a key's token never repeats; the ledger's unique
index on "<key>#<token>" then makes a second bill for one claim impossible to write."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.store.sql import Database, Tx

CHANNEL = "imagegen_claims"
# Long enough that a heartbeat every third of it survives a busy event loop and a slow
# database round trip; short enough that waiters of a dead owner take over soon.
LEASE_S = 30.0
# Waiters re-read the claim this often: on SQLite (no notifications; one host) that is how
# they learn of a release; on PostgreSQL it is the fallback for a notification lost with a
# dropped connection, and for the lease of a dead owner running out.
POLL_S = {"sqlite": 0.1, "postgresql": 1.0}


def process_owner() -> str:
    """This process's owner id: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class FencedError(Exception):
    """Another process took the claim over (this owner's lease ran out): the work must not
    be published or billed."""


@dataclass(frozen=True)
class Claim:
    key: str
    owner: str
    token: int

    @property
    def billing_id(self) -> str:
        """What the ledger's row for this claim's generation carries (unique there)."""
        return f"{self.key}#{self.token}"


@dataclass(frozen=True)
class Released:
    """What a waiter finds once a key is no longer held: the failure its owner left for
    waiters to share (None: look in the cache, and if nothing is there, take the claim)."""

    failure: Mapping[str, Any] | None


class Claims:
    def __init__(self, db: Database, *, owner: str | None = None, lease_s: float = LEASE_S) -> None:
        self.db = db
        self.owner = owner or process_owner()
        self.lease_s = lease_s

    def take(self, key: str) -> Claim | None:
        """The claim on `key` if no live holder has it (a new row, a released one, or an
        expired lease); None while another holds it."""
        now = time.time()
        with self.db.transaction() as tx:
            rows = tx.execute(
                "INSERT INTO claims (key, owner, token, expires, failure) "
                "VALUES (?, ?, 1, ?, NULL) ON CONFLICT (key) DO UPDATE SET "
                "owner = excluded.owner, token = claims.token + 1, "
                "expires = excluded.expires, failure = NULL "
                "WHERE claims.expires < ? RETURNING token",
                (key, self.owner, now + self.lease_s, now),
            ).rows
        return Claim(key, self.owner, int(rows[0]["token"])) if rows else None

    def heartbeat(self, claim: Claim) -> bool:
        """Renew the lease; False once another holder has the key (stop: it is fenced)."""
        with self.db.transaction() as tx:
            changed = tx.execute(
                "UPDATE claims SET expires = ? WHERE key = ? AND token = ? AND owner = ? "
                "AND expires > 0",
                (time.time() + self.lease_s, claim.key, claim.token, claim.owner),
            ).rowcount
        return bool(changed == 1)

    def fence(self, tx: Tx, claim: Claim) -> None:
        """Raise FencedError unless `claim` is still the key's current one, and hold the row
        until `tx` ends so no one takes it over meanwhile. The first statement of a publish."""
        lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""
        row = tx.execute(
            f"SELECT owner, token FROM claims WHERE key = ?{lock}", (claim.key,)
        ).fetchone()
        if row is None or int(row["token"]) != claim.token or row["owner"] != claim.owner:
            raise FencedError(f"claim {claim.billing_id} was taken over by another process")

    def release(
        self, claim: Claim, tx: Tx | None = None, *, failure: Mapping[str, Any] | None = None
    ) -> None:
        """Give the key up (in `tx` where given: the publish's own transaction), leaving
        `failure` for its waiters; a no-op once released or taken over."""
        if tx is None:
            with self.db.transaction() as own:
                self.release(claim, own, failure=failure)
            return
        changed = tx.execute(
            "UPDATE claims SET expires = 0, failure = ? WHERE key = ? AND token = ? "
            "AND owner = ? AND expires > 0",
            (
                json.dumps(dict(failure)) if failure is not None else None,
                claim.key,
                claim.token,
                claim.owner,
            ),
        ).rowcount
        if changed:
            tx.notify(CHANNEL, claim.key)

    def _released(self, key: str) -> Released | None:
        rows = self.db.execute("SELECT expires, failure FROM claims WHERE key = ?", (key,))
        if rows and float(rows[0]["expires"]) >= time.time():
            return None
        failure = json.loads(rows[0]["failure"]) if rows and rows[0]["failure"] else None
        return Released(failure)

    async def wait(self, key: str) -> Released:
        """Until `key` is released or its holder's lease runs out."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def on_notify(payload: str) -> None:
            if payload == key:
                loop.call_soon_threadsafe(woken.set)

        unsubscribe = self.db.subscribe(CHANNEL, on_notify)
        try:
            while (released := await asyncio.to_thread(self._released, key)) is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), POLL_S[self.db.dialect])
                woken.clear()
            return released
        finally:
            unsubscribe()
