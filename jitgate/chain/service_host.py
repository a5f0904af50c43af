"""The mitmproxy side of the access service: its options, its lifecycle and its background loop.

One `AccessServiceHost` owns an `AccessService` in a mitmproxy process: it declares the store
options, opens the store at configuration (a bad store stops the start), starts webhooks, runs
automatic approval and expiry every `grant_maintenance_interval` seconds, and tells subscribers
(the grants step, which ends live sessions) which grants ended. The steps that use the service
(addons/grants.py, addons/access_api.py) are handed the same instance.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, exceptions

from jitgate.access.errors import StoreError
from jitgate.access.service import AccessService
from jitgate.chain.flow import current_policy, declare_policy_option
from jitgate.store.sqlite import SQLiteStore

log = logging.getLogger("jitgate.access")


class AccessServiceHost:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        if service.store_factory is None:
            service.store_factory = SQLiteStore  # the embedded default backend
        self.maintenance: asyncio.Task | None = None
        self.store_failing = False

    def load(self, loader) -> None:
        declare_policy_option(loader)
        loader.add_option(
            "grant_store", str, "state/jitgate.db",
            "SQLite file holding access requests, reviews and grants (shared with the jitgate CLI "
            "and other gateway processes on this host; created 0600).",
        )
        loader.add_option(
            "grant_maintenance_interval", int, 1,
            "Seconds between runs of automatic approvals, expiry, and ending the sessions of ended grants.",
        )

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            policy = current_policy()
            self.service.set_policy(policy.access_rules, policy.webhooks)
        if "grant_store" in updated:
            if not ctx.options.grant_store:
                raise exceptions.OptionsError("grant_store must name a file")
            try:
                self.service.open_store(ctx.options.grant_store)
            except StoreError as e:
                raise exceptions.OptionsError(f"cannot open the grant store: {e}") from None
        if "grant_maintenance_interval" in updated and ctx.options.grant_maintenance_interval < 1:
            raise exceptions.OptionsError("grant_maintenance_interval must be at least 1 second")

    async def running(self) -> None:
        self.service.start(asyncio.get_running_loop())
        if self.maintenance is None:
            self.maintenance = asyncio.create_task(self.maintain())

    async def done(self) -> None:
        if self.maintenance is not None:
            self.maintenance.cancel()
            self.maintenance = None
        await self.service.stop()

    async def maintain(self) -> None:
        while True:
            await asyncio.sleep(ctx.options.grant_maintenance_interval)
            now, ended = time.time(), []
            try:
                ended = await self.service.maintain(now)
            except StoreError as e:
                if not self.store_failing:
                    log.error("grant store maintenance failed: %s", e)
                self.store_failing = True
            except Exception:  # keep the loop alive: it is what ends revoked sessions
                log.exception("grant maintenance failed")
            else:
                self.store_failing = False
            # Told even when the store failed: grants still end on time.
            self.service.tell_listeners(now, ended)
