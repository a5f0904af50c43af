"""The SQLite grant store: whole request lifecycles, refusals that change nothing, durability,
several processes at once, failing closed, and the indexed hot-path lookup."""

from __future__ import annotations

import multiprocessing
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from jitgate.access.errors import Conflict, InvalidRequest, NotAllowed, NotFound
from jitgate.access.model import GrantState, Operation, Person, RequestState
from jitgate.access.rules import AccessRule, Approval, ApprovalMode
from jitgate.access.scope import ANY_RESOURCE, SYSTEM_ACTOR, ResourceRef, Scope
from jitgate.store.sqlite import ACTIVE_GRANTS_SQL, SQLiteStore, StoreError

T0 = 1_700_000_000.0
HOUR = 3600


def make_rules() -> tuple[AccessRule, ...]:
    common = dict(requesters=("devs",), clusters=("dev",), cluster_wide=False, duration_default=HOUR, duration_max=4 * HOUR, request_ttl=HOUR)
    return (
        AccessRule(
            name="two-approvers",
            namespaces=("dev", "team-*"),
            resources=(ResourceRef("pods"), ResourceRef("pods", "", "log")),
            verbs=("get", "list", "watch"),
            approval=Approval(ApprovalMode.REVIEWERS, ("sre", "security"), 2),
            require_reason=True,
            upstream_role="readonly",
            **common,
        ),
        AccessRule(
            name="auto-read",
            namespaces=("staging",),
            resources=(ResourceRef("pods"),),
            verbs=("get", "list"),
            approval=Approval(ApprovalMode.AUTO, ("sre",), None, 120),
            **common,
        ),
        AccessRule(
            name="sandbox",
            namespaces=("sandbox",),
            resources=(ANY_RESOURCE,),
            verbs=("get", "list", "delete"),
            approval=Approval(ApprovalMode.IMMEDIATE, ("sre",), None),
            **common,
        ),
    )


RULES = make_rules()
ALICE = Person("alice", ("devs", "sre"))  # a requester who is also a reviewer: never of her own request
ERIN = Person("erin", ("devs",))
BOB = Person("bob", ("sre",))
CAROL = Person("carol", ("security",))
DAVE = Person("dave", ("sre", "security"))  # in both reviewer groups: still one person
DEV_PODS = Scope("dev", ("dev",), False, ("pods",), ("get", "list"))
STAGING_PODS = Scope("dev", ("staging",), False, ("pods",), ("get",))
SANDBOX = Scope("dev", ("sandbox",), False, ("*",), ("delete",))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "grants.db"


@pytest.fixture
def store(path: Path):
    with SQLiteStore(path) as s:
        yield s


def snapshot(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, read by a connection of its own."""
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ("requests", "reviews", "grants", "events")}
    finally:
        db.close()


def kinds(store: SQLiteStore, request_id: str) -> list[str]:
    return [str(e.kind) for e in store.events_for(request_id)]


def test_two_distinct_approvers(store: SQLiteStore, path: Path) -> None:
    request = store.create_request(RULES, ALICE, DEV_PODS, now=T0, duration=2 * HOUR, reason="debug the payment outage")
    assert (request.state, request.rule, request.requester_groups, request.expires_at) == (RequestState.PENDING, "two-approvers", ("devs", "sre"), T0 + HOUR)
    assert store.active_grants_for("alice", "dev", T0 + 1) == ()

    # Dave is in both reviewer groups: his approval counts once, and a second one is refused.
    after_dave = store.review(RULES, request.id, DAVE, "approve", "", now=T0 + 10)
    assert after_dave.state is RequestState.PENDING and after_dave.approvers == ("dave",)
    before = snapshot(path)
    with pytest.raises(Conflict, match=f"you already approved request {request.id}") as e:
        store.review(RULES, request.id, DAVE, "approve", "again", now=T0 + 11)
    assert e.value.status == 409 and snapshot(path) == before

    approved = store.review(RULES, request.id, CAROL, "approve", "looks right", now=T0 + 20)
    grant = approved.grant
    assert approved.state is RequestState.APPROVED and approved.approvers == ("dave", "carol")
    assert (approved.decided_at, approved.decided_by) == (T0 + 20, "carol")
    assert (grant.username, grant.scope, grant.upstream_role, grant.state) == ("alice", DEV_PODS, "readonly", GrantState.ACTIVE)
    assert (grant.starts_at, grant.ends_at) == (T0 + 20, T0 + 20 + 2 * HOUR)  # the clock starts at approval
    assert store.get_request(request.id) == approved
    assert store.get_grant(grant.id) == grant
    assert store.active_grants_for("alice", "dev", T0 + 30) == (grant,)
    assert store.active_grants_for("alice", "prod", T0 + 30) == ()
    assert store.active_grants_for("erin", "dev", T0 + 30) == ()
    assert kinds(store, request.id) == ["request.created", "review.approved", "review.approved", "request.approved"]
    events = store.events_for(request.id)
    assert events[-1].grant_id == grant.id and events[-1].detail["approvers"] == ["dave", "carol"]
    assert events[1].detail == {"approvals": 1, "required": 2}

    # Ended grants are never returned, swept or not; the sweep records the expiry.
    end = grant.ends_at
    assert store.active_grants_for("alice", "dev", end) == ()
    result = store.sweep(now=end)
    assert [g.id for g in result.expired_grants] == [grant.id] and result.expired_requests == ()
    assert store.get_grant(grant.id).state is GrantState.EXPIRED
    assert kinds(store, request.id)[-1] == "grant.expired"
    assert not store.sweep(now=end + 1)


def test_refused_reviews_change_nothing(store: SQLiteStore, path: Path) -> None:
    pending = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    cancelled = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    store.cancel(cancelled.id, ALICE, "not needed", now=T0 + 1)
    denied = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    store.review(RULES, denied.id, BOB, "deny", "no ticket", now=T0 + 1)
    approved = store.create_request(RULES, ERIN, DEV_PODS, now=T0, reason="r")
    store.review(RULES, approved.id, BOB, "approve", "", now=T0 + 1)
    store.review(RULES, approved.id, CAROL, "approve", "", now=T0 + 2)

    cases = [
        (pending.id, ALICE, "approve", "", T0 + 5, NotAllowed, f"you cannot review your own request {pending.id}"),
        (pending.id, ALICE, "deny", "no", T0 + 5, NotAllowed, "you cannot review your own request"),
        (pending.id, ERIN, "approve", "", T0 + 5, NotAllowed, "you are not a reviewer of access rule 'two-approvers' (reviewer groups: sre, security)"),
        (pending.id, Person("mallory", ()), "approve", "", T0 + 5, NotAllowed, "not a reviewer"),
        (pending.id, BOB, "deny", "  ", T0 + 5, InvalidRequest, "a reason for the denial is required"),
        (pending.id, BOB, "approve", "", T0 + HOUR, Conflict, f"request {pending.id} expired at"),  # not swept yet
        ("req-doesnotexist", BOB, "approve", "", T0 + 5, NotFound, "there is no access request 'req-doesnotexist'"),
        (cancelled.id, BOB, "approve", "", T0 + 5, Conflict, f"request {cancelled.id} is already cancelled"),
        (denied.id, CAROL, "approve", "", T0 + 5, Conflict, "is already denied"),
        (approved.id, DAVE, "approve", "", T0 + 5, Conflict, "is already approved"),
        (approved.id, DAVE, "deny", "too late", T0 + 5, Conflict, "is already approved"),
    ]
    statuses = {NotAllowed: 403, InvalidRequest: 400, Conflict: 409, NotFound: 404}
    before = snapshot(path)
    for request_id, who, decision, reason, now, error, message in cases:
        with pytest.raises(error) as e:
            store.review(RULES, request_id, who, decision, reason, now=now)
        assert message in e.value.message
        assert e.value.status == statuses[error]
        assert snapshot(path) == before, (who, decision)
    with pytest.raises(NotAllowed, match="only alice, who made request .*, can cancel it"):
        store.cancel(pending.id, BOB, now=T0 + 5)
    with pytest.raises(Conflict, match="is already denied"):
        store.cancel(denied.id, ALICE, now=T0 + 5)
    assert snapshot(path) == before


def test_deny_wins(store: SQLiteStore) -> None:
    request = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    store.review(RULES, request.id, BOB, "approve", "fine by me", now=T0 + 1)
    denied = store.review(RULES, request.id, CAROL, "deny", "not during the freeze", now=T0 + 2)
    assert (denied.state, denied.decided_by, denied.decision_reason, denied.grant) == (RequestState.DENIED, "carol", "not during the freeze", None)
    with pytest.raises(Conflict):
        store.review(RULES, request.id, DAVE, "approve", "", now=T0 + 3)
    assert store.active_grants_for("alice", "dev", T0 + 4) == ()
    assert kinds(store, request.id) == ["request.created", "review.approved", "review.denied", "request.denied"]


def test_auto_approval_fires_on_time_unless_denied(store: SQLiteStore) -> None:
    quiet = store.create_request(RULES, ERIN, STAGING_PODS, now=T0)
    vetoed = store.create_request(RULES, ALICE, STAGING_PODS, now=T0 + 1)
    assert (quiet.rule, quiet.auto_approve_at) == ("auto-read", T0 + 120)
    # An approval does not shorten the delay when the rule sets no `required`.
    assert store.review(RULES, quiet.id, BOB, "approve", "", now=T0 + 5).state is RequestState.PENDING
    store.review(RULES, vetoed.id, BOB, "deny", "use the read-only dashboard", now=T0 + 60)

    assert store.approve_due_auto(RULES, now=T0 + 119.9) == []
    (approved,) = store.approve_due_auto(RULES, now=T0 + 120)
    assert (approved.id, approved.state, approved.decided_by) == (quiet.id, RequestState.APPROVED, SYSTEM_ACTOR)
    assert (approved.grant.starts_at, approved.grant.ends_at) == (T0 + 120, T0 + 120 + HOUR)
    assert store.approve_due_auto(RULES, now=T0 + 500) == []
    assert store.get_request(vetoed.id).state is RequestState.DENIED
    assert kinds(store, quiet.id) == ["request.created", "review.approved", "request.approved"]
    assert store.events_for(quiet.id)[-1].reason == "approved automatically: no reviewer denied within 2m"


def test_auto_approval_when_the_rule_is_gone(store: SQLiteStore) -> None:
    orphan = store.create_request(RULES, ERIN, STAGING_PODS, now=T0)
    without = tuple(r for r in RULES if r.name != "auto-read")
    (denied,) = store.approve_due_auto(without, now=T0 + 120)
    assert (denied.id, denied.state, denied.decided_by, denied.grant) == (orphan.id, RequestState.DENIED, SYSTEM_ACTOR, None)
    assert denied.decision_reason == f"access rule 'auto-read' is no longer in the policy; request {orphan.id} cannot be approved"
    assert kinds(store, orphan.id) == ["request.created", "request.denied"]


def test_auto_approval_withdrawn_when_the_rule_wants_reviewers(store: SQLiteStore) -> None:
    request = store.create_request(RULES, ERIN, STAGING_PODS, now=T0)
    auto = RULES[1]
    reviewers_rule = AccessRule(
        name=auto.name, requesters=auto.requesters, clusters=auto.clusters, namespaces=auto.namespaces, cluster_wide=False,
        resources=auto.resources, verbs=auto.verbs, duration_default=HOUR, duration_max=HOUR,
        approval=Approval(ApprovalMode.REVIEWERS, ("sre",), 1),
    )  # fmt: skip
    changed = (RULES[0], reviewers_rule, RULES[2])
    (withdrawn,) = store.approve_due_auto(changed, now=T0 + 120)
    assert (withdrawn.state, withdrawn.auto_approve_at) == (RequestState.PENDING, None)
    assert store.approve_due_auto(changed, now=T0 + 121) == []
    assert store.review(changed, request.id, BOB, "approve", "", now=T0 + 130).state is RequestState.APPROVED
    assert kinds(store, request.id) == ["request.created", "request.auto_approval_withdrawn", "review.approved", "request.approved"]


def test_immediate_mode(store: SQLiteStore) -> None:
    request = store.create_request(RULES, ERIN, SANDBOX, now=T0)
    assert (request.state, request.decided_by, request.decided_at) == (RequestState.APPROVED, SYSTEM_ACTOR, T0)
    assert store.active_grants_for("erin", "dev", T0) == (request.grant,)
    assert request.grant.ends_at == T0 + HOUR
    assert kinds(store, request.id) == ["request.created", "request.approved"]
    assert store.events_for(request.id)[-1].reason == "immediate approval by access rule 'sandbox'"


def test_request_validation_and_policy_refusals(store: SQLiteStore, path: Path) -> None:
    before = snapshot(path)
    with pytest.raises(InvalidRequest, match="requires a reason"):
        store.create_request(RULES, ALICE, DEV_PODS, now=T0)
    with pytest.raises(InvalidRequest, match="above the maximum 4h"):
        store.create_request(RULES, ALICE, DEV_PODS, now=T0, duration=5 * HOUR, reason="r")
    with pytest.raises(NotAllowed, match=r"no access rule lets groups \[sre\] request"):
        store.create_request(RULES, BOB, DEV_PODS, now=T0, reason="r")
    with pytest.raises(InvalidRequest, match="no access rule covers"):
        store.create_request(RULES, ALICE, Scope("dev", ("dev",), False, ("secrets",), ("get",)), now=T0, reason="r")
    assert snapshot(path) == before


def test_request_expiry_and_cancel(store: SQLiteStore) -> None:
    stale = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    withdrawn = store.create_request(RULES, ALICE, DEV_PODS, now=T0 + 10, reason="r")
    cancelled = store.cancel(withdrawn.id, ALICE, "fixed it myself", now=T0 + 20)
    assert (cancelled.state, cancelled.decision_reason) == (RequestState.CANCELLED, "fixed it myself")
    assert not store.sweep(now=T0 + HOUR - 1)
    result = store.sweep(now=T0 + HOUR)
    assert [r.id for r in result.expired_requests] == [stale.id]
    assert store.get_request(stale.id).state is RequestState.EXPIRED
    assert store.get_request(withdrawn.id).state is RequestState.CANCELLED  # terminal states stay
    with pytest.raises(Conflict, match="is already expired"):
        store.cancel(stale.id, ALICE, now=T0 + HOUR + 1)
    assert kinds(store, stale.id) == ["request.created", "request.expired"]
    assert kinds(store, withdrawn.id) == ["request.created", "request.cancelled"]


def test_revocation(store: SQLiteStore, path: Path) -> None:
    first = store.create_request(RULES, ERIN, SANDBOX, now=T0).grant
    second = store.create_request(RULES, ERIN, SANDBOX, now=T0).grant
    before = snapshot(path)
    with pytest.raises(NotAllowed, match=f"only erin or a reviewer of access rule 'sandbox' can revoke grant {first.id}"):
        store.revoke_grant(RULES, first.id, CAROL, "no", now=T0 + 1)
    with pytest.raises(InvalidRequest, match="a reason for the revocation is required"):
        store.revoke_grant(RULES, first.id, BOB, "", now=T0 + 1)
    with pytest.raises(NotFound):
        store.revoke_grant(RULES, "grant-nope", BOB, "x", now=T0 + 1)
    assert snapshot(path) == before

    revoked = store.revoke_grant(RULES, first.id, BOB, "suspicious activity", now=T0 + 60)
    assert (revoked.state, revoked.revoked_by, revoked.revoked_at, revoked.revoke_reason) == (GrantState.REVOKED, "bob", T0 + 60, "suspicious activity")
    assert store.active_grants_for("erin", "dev", T0 + 61) == (second,)
    assert store.revoke_grant(RULES, second.id, ERIN, "done", now=T0 + 70).revoked_by == "erin"  # the holder ends their own
    assert store.active_grants_for("erin", "dev", T0 + 71) == ()
    with pytest.raises(Conflict, match=f"grant {first.id} is revoked, not active"):
        store.revoke_grant(RULES, first.id, BOB, "again", now=T0 + 80)
    assert [e.kind for e in store.events_for(first.request_id)][-1] == "grant.revoked"
    assert not store.sweep(now=T0 + 10 * HOUR).expired_grants  # revoked grants do not expire again


def test_lists_and_event_cursor(store: SQLiteStore) -> None:
    a = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    e = store.create_request(RULES, ERIN, DEV_PODS, now=T0 + 1, reason="r")
    s = store.create_request(RULES, ERIN, SANDBOX, now=T0 + 2)
    store.review(RULES, e.id, BOB, "approve", "", now=T0 + 3)
    assert [r.id for r in store.list_requests()] == [s.id, e.id, a.id]
    assert [r.id for r in store.list_requests(requester="erin")] == [s.id, e.id]
    assert [r.id for r in store.list_requests(states=["approved"])] == [s.id]
    assert [r.id for r in store.list_requests(states=[RequestState.PENDING], cluster="dev", limit=1)] == [e.id]
    assert store.list_requests(cluster="prod") == []
    with pytest.raises(InvalidRequest, match="unknown request state; known: pending, approved, denied, expired, cancelled"):
        store.list_requests(states=["open"])
    # Bob already reviewed erin's; alice's own is never hers to review; carol may review both.
    assert [r.id for r in store.reviewable_requests(RULES, BOB, now=T0 + 4)] == [a.id]
    assert [r.id for r in store.reviewable_requests(RULES, ALICE, now=T0 + 4)] == [e.id]
    assert [r.id for r in store.reviewable_requests(RULES, CAROL, now=T0 + 4)] == [e.id, a.id]
    assert store.reviewable_requests(RULES, CAROL, now=T0 + HOUR + 1) == []  # both expired
    assert store.reviewable_requests(RULES, ERIN, now=T0 + 4) == []
    assert [g.id for g in store.list_grants(username="erin", active_at=T0 + 5)] == [s.grant.id]

    events = store.events_since(0)
    assert [ev.id for ev in events] == list(range(1, len(events) + 1))
    assert [str(ev.kind) for ev in store.events_since(events[-2].id)] == ["review.approved"]
    assert store.events_since(events[-1].id) == []
    assert store.last_event_id() == events[-1].id  # where a new reader's cursor starts
    assert events[0].to_dict()["at"] == "2023-11-14T22:13:20Z"


def test_every_public_method_is_in_this_contract() -> None:
    """This file is the contract another backend (PostgreSQL) must pass: every public method of
    the store is called by a test here, so a new one cannot slip in untested."""
    public = {name for name, value in vars(SQLiteStore).items() if callable(value) and not name.startswith("_")}
    assert public == {
        "create_request", "get_request", "list_requests", "reviewable_requests", "review", "cancel", "revoke_grant",
        "get_grant", "list_grants", "active_grants_for", "sweep", "approve_due_auto", "events_for", "events_since",
        "last_event_id", "change_counter", "close", "operation_request",
    }
    source = Path(__file__).read_text()
    assert [name for name in sorted(public) if f".{name}(" not in source] == []


def test_durable_across_restart(path: Path) -> None:
    with SQLiteStore(path) as gateway:
        request = gateway.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
        gateway.review(RULES, request.id, BOB, "approve", "one", now=T0 + 1)
    with SQLiteStore(path) as restarted:  # the process restarted mid-workflow
        assert restarted.get_request(request.id).approvers == ("bob",)
        grant = restarted.review(RULES, request.id, CAROL, "approve", "two", now=T0 + 2).grant
    with SQLiteStore(path) as again:
        assert again.active_grants_for("alice", "dev", T0 + 3) == (grant,)
        assert kinds(again, request.id) == ["request.created", "review.approved", "review.approved", "request.approved"]


def test_files_are_private(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    path = shared / "state" / "grants.db"
    with SQLiteStore(path) as store:
        store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # existing folders keep their mode
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(name.stat().st_mode) == 0o600, name


def test_events_are_append_only(store: SQLiteStore, path: Path) -> None:
    store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
    db = sqlite3.connect(path)
    try:
        for sql in ("UPDATE events SET actor = 'someone-else'", "DELETE FROM events"):
            with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
                db.execute(sql)
    finally:
        db.close()


def test_change_counter_sees_other_writers(store: SQLiteStore, path: Path) -> None:
    start = store.change_counter()
    store.get_request(store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r").id)
    mine = store.change_counter()
    assert mine != start
    store.list_requests()
    store.sweep(now=T0)  # found nothing to do
    assert store.change_counter() == mine  # reads and no-op writes change nothing
    with SQLiteStore(path) as other:  # another process's connection
        other.create_request(RULES, ERIN, SANDBOX, now=T0)
    assert store.change_counter() != mine


def _review_worker(path: str, who: tuple[str, tuple[str, ...]], ids: list[str], barrier, results) -> None:
    store = SQLiteStore(path, busy_timeout=20)
    outcomes = []
    for request_id in ids:
        barrier.wait()
        try:
            store.review(make_rules(), request_id, Person(*who), "approve", "", now=T0 + 10)
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")
    store.close()
    results.put((who[0], outcomes))


def test_reviews_from_three_processes_at_once(store: SQLiteStore, path: Path) -> None:
    ids = [store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason=f"r{i}").id for i in range(12)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    reviewers = [("bob", ("sre",)), ("carol", ("security",)), ("dave", ("sre", "security"))]
    procs = [ctx.Process(target=_review_worker, args=(str(path), who, ids, barrier, results)) for who in reviewers]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    # Two of the three approvals land on each request, the third finds it approved already.
    for i, request_id in enumerate(ids):
        column = [outcomes[name][i] for name, _ in reviewers]
        assert sorted(column) == ["conflict", "ok", "ok"], column
        request = store.get_request(request_id)
        assert request.state is RequestState.APPROVED and len(request.reviews) == 2 and request.grant is not None
    rows = snapshot(path)
    assert len(rows["grants"]) == len(ids) == len({g[1] for g in rows["grants"]})  # one grant per request
    assert len(rows["reviews"]) == 2 * len(ids)


def test_threads_share_a_store(store: SQLiteStore) -> None:
    ids = [store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r").id for _ in range(5)]
    errors: list[BaseException] = []

    def approve(who: Person) -> None:
        try:
            for request_id in ids:
                store.review(RULES, request_id, who, "approve", "", now=T0 + 1)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=approve, args=(who,)) for who in (BOB, CAROL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(store.get_request(i).state is RequestState.APPROVED for i in ids)


def test_locked_past_busy_timeout_fails_closed(path: Path) -> None:
    with SQLiteStore(path, busy_timeout=0.2) as store:
        request = store.create_request(RULES, ALICE, DEV_PODS, now=T0, reason="r")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            before_counter = store.change_counter()
            with pytest.raises(StoreError, match="grant store unavailable: .*locked") as e:
                store.review(RULES, request.id, BOB, "approve", "", now=T0 + 1)
            assert e.value.status == 503
            assert store.get_request(request.id).approvers == ()  # readers are not blocked in WAL
            assert store.change_counter() == before_counter
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.review(RULES, request.id, BOB, "approve", "", now=T0 + 1).approvers == ("bob",)


def test_unusable_files_raise_store_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, just some bytes " * 200)
    with pytest.raises(StoreError, match="grant store unavailable: .*garbage.db: file is not a database"):
        SQLiteStore(garbage)

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(StoreError, match="grant store unavailable: .*Not a directory"):
        SQLiteStore(not_a_folder / "grants.db")
    with pytest.raises(StoreError, match="grant store unavailable"):
        SQLiteStore(tmp_path)  # a folder, not a file

    foreign = tmp_path / "other-app.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE notes (text)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="an SQLite database but not a jitgate store"):
        SQLiteStore(foreign)

    newer = tmp_path / "newer.db"
    SQLiteStore(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99; this jitgate supports version 2"):
        SQLiteStore(newer)


def test_corruption_while_running_fails_closed(path: Path) -> None:
    store = SQLiteStore(path)
    request = store.create_request(RULES, ERIN, SANDBOX, now=T0)
    store.close()
    # Damage the pages after the header, as a bad disk or a partial copy would.
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8000)
    with pytest.raises(StoreError, match="grant store unavailable"):
        with SQLiteStore(path) as damaged:
            damaged.active_grants_for("erin", "dev", T0 + 1)
    # A record that no longer decodes is an error too, never a narrower or wider grant.
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with SQLiteStore(path) as store:
        request = store.create_request(RULES, ERIN, SANDBOX, now=T0)
        db = sqlite3.connect(path)
        db.execute("UPDATE grants SET scope = '{\"cluster\": \"dev\", \"verbs\": \"bogus\"}'")
        db.commit()
        db.close()
        with pytest.raises(StoreError, match="unreadable record in the store: invalid scope"):
            store.active_grants_for("erin", "dev", T0 + 1)
        with pytest.raises(StoreError):
            store.get_request(request.id)


def test_closed_store_refuses(path: Path) -> None:
    store = SQLiteStore(path)
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        store.active_grants_for("erin", "dev", T0)


def test_active_grants_is_an_index_lookup_among_100k(store: SQLiteStore, path: Path) -> None:
    mine = store.create_request(RULES, ERIN, SANDBOX, now=T0).grant
    db = sqlite3.connect(path)
    scope = '{"cluster":"dev","cluster_wide":false,"namespaces":["dev"],"resources":["pods"],"verbs":["get"]}'
    requests, grants = [], []
    for i in range(100_000):
        user = f"user{i % 5000}"
        state = ("active", "expired", "revoked")[i % 3]
        requests.append((f"req-bulk{i}", user, "[]", "sandbox", "dev", scope, HOUR, "", "approved", T0, T0 + HOUR))
        grants.append((f"grant-bulk{i}", f"req-bulk{i}", user, "dev" if i % 2 else "prod", "sandbox", scope, T0 - i, T0 - i + HOUR, state))
    with db:
        db.executemany("INSERT INTO requests (id, requester, requester_groups, rule, cluster, scope, duration, reason, state, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", requests)
        db.executemany("INSERT INTO grants (id, request_id, username, cluster, rule, scope, starts_at, ends_at, state) VALUES (?,?,?,?,?,?,?,?,?)", grants)
        db.execute("ANALYZE")
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + ACTIVE_GRANTS_SQL, ("erin", "dev", T0, T0)))
    db.close()
    assert "USING INDEX grants_lookup (username=? AND cluster=? AND state=? AND ends_at>?)" in plan, plan
    assert "SCAN" not in plan, plan

    assert store.active_grants_for("erin", "dev", T0 + 1) == (mine,)
    # user1's grants: i = 1, 5001, 10001, ...; active ones have i % 3 == 0, dev ones odd i.
    expected = {f"grant-bulk{i}" for i in range(1, 100_000, 5000) if i % 3 == 0 and i % 2 and T0 - i + HOUR > T0}
    assert {g.id for g in store.active_grants_for("user1", "dev", T0)} == expected


# --- operation-bound requests (a guardrail's require-approval) ----------------------------------------

DELETE_WEB = Operation("d" * 64, "DELETE", "/apis/apps/v1/namespaces/dev/deployments/web", "delete deployments/web in dev",
                       "prod-delete", required=2)
DEV_DELETE = Scope("dev", ("dev",), False, ("pods",), ("get",))


def test_operation_request_is_approved_into_one_use_permit(store: SQLiteStore, path: Path) -> None:
    kind, request = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0, rule_name="two-approvers")
    assert kind == "filed" and request.state is RequestState.PENDING and request.operation == DELETE_WEB
    again, joined = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0 + 1, rule_name="two-approvers")
    assert (again, joined.id) == ("pending", request.id)  # a retry joins the pending request
    assert request.to_dict()["operation"]["summary"] == "delete deployments/web in dev"
    assert [r.id for r in store.reviewable_requests(RULES, BOB, now=T0 + 2)] == [request.id]
    with pytest.raises(NotAllowed):
        store.review(RULES, request.id, ALICE, "approve", "mine", now=T0 + 2)
    assert store.review(RULES, request.id, BOB, "approve", "ok", now=T0 + 2).state is RequestState.PENDING
    approved = store.review(RULES, request.id, CAROL, "approve", "ok", now=T0 + 3)
    assert approved.state is RequestState.APPROVED and approved.grant is None  # nothing standing
    assert approved.permit is not None and approved.permit.used_at is None
    assert store.active_grants_for("alice", "dev", T0 + 4) == ()
    # Someone else's identical call, or a different body, has no permit.
    assert store.operation_request(RULES, ERIN, DEV_DELETE, DELETE_WEB, now=T0 + 4)[0] == "filed"
    other = Operation("e" * 64, *list(DELETE_WEB.to_dict().values())[1:])
    kind, fresh = store.operation_request(RULES, ALICE, DEV_DELETE, other, now=T0 + 4, rule_name="two-approvers")
    assert kind == "filed" and fresh.id != request.id
    kind, used = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0 + 5, rule_name="two-approvers")
    assert (kind, used.id) == ("allowed", request.id) and used.permit.used_at == T0 + 5
    kind, next_one = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0 + 6, rule_name="two-approvers")
    assert kind == "filed" and next_one.id != request.id  # used once: the next run needs a new approval
    assert [str(e.kind) for e in store.events_for(request.id)][-2:] == ["request.approved", "permit.used"]
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM permits").fetchone()[0] == 1


def test_operation_request_under_an_immediate_rule_still_needs_a_reviewer(store: SQLiteStore) -> None:
    op = Operation("f" * 64, "DELETE", "/api/v1/namespaces/sandbox/pods/x", "delete pods/x in sandbox", "g")
    kind, request = store.operation_request(RULES, ALICE, SANDBOX, op, now=T0)
    assert kind == "filed" and request.state is RequestState.PENDING and request.rule == "sandbox"
    assert store.review(RULES, request.id, BOB, "approve", "", now=T0 + 1).permit is not None  # one approval (the rule's default)


def test_an_expired_permit_lets_nothing_through(store: SQLiteStore) -> None:
    _, request = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0, rule_name="two-approvers")
    store.review(RULES, request.id, BOB, "approve", "", now=T0)
    store.review(RULES, request.id, CAROL, "approve", "", now=T0)
    assert store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0 + 2 * HOUR, rule_name="two-approvers")[0] == "filed"


def _permit_worker(path: str, barrier, results) -> None:
    store = SQLiteStore(path)
    barrier.wait()
    kind, _ = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0 + 10, rule_name="two-approvers")
    store.close()
    results.put(kind)


def test_two_identical_concurrent_calls_use_one_permit(store: SQLiteStore, path: Path) -> None:
    _, request = store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0, rule_name="two-approvers")
    store.review(RULES, request.id, BOB, "approve", "", now=T0)
    store.review(RULES, request.id, CAROL, "approve", "", now=T0)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_permit_worker, args=(str(path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    kinds = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    # Exactly one passes; the first loser files a new request, the others join it.
    assert kinds == ["allowed", "filed", "pending", "pending"], kinds


def test_a_version_1_store_is_migrated(tmp_path: Path) -> None:
    old = tmp_path / "v1.db"
    SQLiteStore(old).close()
    db = sqlite3.connect(old)  # make it what version 1 wrote: no operation columns, no permits
    db.execute("DROP TABLE permits")
    db.execute("DROP INDEX requests_by_operation")
    db.execute("ALTER TABLE requests DROP COLUMN operation_digest")
    db.execute("ALTER TABLE requests DROP COLUMN operation")
    db.execute("UPDATE schema_version SET version = 1")
    db.commit()
    db.close()
    with SQLiteStore(old) as store:
        assert store.operation_request(RULES, ALICE, DEV_DELETE, DELETE_WEB, now=T0, rule_name="two-approvers")[0] == "filed"
    assert sqlite3.connect(old).execute("SELECT version FROM schema_version").fetchone()[0] == 2
