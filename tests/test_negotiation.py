"""Tests for operational key negotiation (RFC 7143 sections 6.2 and 13), initiator side.

The expected outcomes are computed here from our own copy of the RFC's rule table, not from the
module's, so a wrong row in either shows up as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_failover.errors import LocalProtocolError, NegotiationError, ProtocolError
from pyiscsi_failover.protocol.negotiation import (
    LOGIN_KEYS,
    Digest,
    Negotiator,
    OperationalParameters,
    OperationalProposal,
    SessionType,
)
from pyiscsi_failover.protocol.text import encode_text

# -- the RFC 7143 table, independently ---------------------------------------------------------

MAX24 = 2**24 - 1


@dataclass(frozen=True)
class Row:
    function: str  # "list", "min", "max", "or", "and"
    default: object
    low: int
    high: int
    field: str
    irrelevant_in_discovery: bool


TABLE = {
    "HeaderDigest": Row("list", Digest.NONE, 0, 0, "header_digest", False),
    "DataDigest": Row("list", Digest.NONE, 0, 0, "data_digest", False),
    "MaxConnections": Row("min", 1, 1, 65535, "max_connections", True),
    "InitialR2T": Row("or", True, 0, 0, "initial_r2t", True),
    "ImmediateData": Row("and", True, 0, 0, "immediate_data", True),
    "MaxBurstLength": Row("min", 262144, 512, MAX24, "max_burst_length", True),
    "FirstBurstLength": Row("min", 65536, 512, MAX24, "first_burst_length", True),
    "DefaultTime2Wait": Row("max", 2, 0, 3600, "default_time2wait", False),
    "DefaultTime2Retain": Row("min", 20, 0, 3600, "default_time2retain", False),
    "MaxOutstandingR2T": Row("min", 1, 1, 65535, "max_outstanding_r2t", True),
    "DataPDUInOrder": Row("or", True, 0, 0, "data_pdu_in_order", True),
    "DataSequenceInOrder": Row("or", True, 0, 0, "data_sequence_in_order", True),
    "ErrorRecoveryLevel": Row("min", 0, 0, 2, "error_recovery_level", False),
}
NEGOTIATED = list(TABLE)
RELEVANT_IN_DISCOVERY = [key for key, row in TABLE.items() if not row.irrelevant_in_discovery]


def fmt(value: object) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, Digest):
        return value.value
    if isinstance(value, tuple):
        return ",".join(fmt(item) for item in value)
    return str(value)


def normal(proposal: OperationalProposal | None = None) -> Negotiator:
    return Negotiator(proposal or OperationalProposal(), session_type=SessionType.NORMAL)


def discovery(proposal: OperationalProposal | None = None) -> Negotiator:
    return Negotiator(proposal or OperationalProposal(), session_type=SessionType.DISCOVERY)


def echo(offer: list[tuple[str, str]], keys: object) -> list[tuple[str, str]]:
    """A target's answers that pick our first choice for each of ``keys``."""
    return [(key, value.split(",")[0]) for key, value in offer if key in keys]  # type: ignore[operator]


def full_answers(negotiator: Negotiator) -> list[tuple[str, str]]:
    """Offer, and answer every negotiated key the way a target happy with our values would."""
    return echo(negotiator.offer(), TABLE)


# -- strategies --------------------------------------------------------------------------------

digest_lists = st.lists(st.sampled_from(list(Digest)), min_size=1, max_size=2, unique=True).map(
    tuple
)


@st.composite
def proposals(draw: st.DrawFn) -> OperationalProposal:
    max_burst = draw(st.integers(512, MAX24))
    return OperationalProposal(
        header_digest=draw(digest_lists),
        data_digest=draw(digest_lists),
        max_connections=draw(st.integers(1, 65535)),
        initial_r2t=draw(st.booleans()),
        immediate_data=draw(st.booleans()),
        max_recv_data_segment_length=draw(st.integers(512, MAX24)),
        max_burst_length=max_burst,
        first_burst_length=draw(st.integers(512, max_burst)),
        default_time2wait=draw(st.integers(0, 3600)),
        default_time2retain=draw(st.integers(0, 3600)),
        max_outstanding_r2t=draw(st.integers(1, 65535)),
        data_pdu_in_order=draw(st.booleans()),
        data_sequence_in_order=draw(st.booleans()),
        error_recovery_level=draw(st.integers(0, 2)),
    )


@dataclass(frozen=True)
class Target:
    """A compliant target's own preferences."""

    digests: dict[str, frozenset[Digest]]
    numbers: dict[str, int]
    flags: dict[str, bool]
    hex_numbers: bool


@st.composite
def targets(draw: st.DrawFn) -> Target:
    numbers = {
        key: draw(st.integers(row.low, row.high))
        for key, row in TABLE.items()
        if row.function in ("min", "max")
    }
    # A compliant target never prefers a first burst longer than its maximum burst.
    numbers["FirstBurstLength"] = draw(st.integers(512, numbers["MaxBurstLength"]))
    return Target(
        digests={
            key: draw(st.frozensets(st.sampled_from(list(Digest))))
            for key in ("HeaderDigest", "DataDigest")
        },
        numbers=numbers,
        flags={
            key: draw(st.booleans()) for key, row in TABLE.items() if row.function in ("or", "and")
        },
        hex_numbers=draw(st.booleans()),
    )


def expected_outcome(key: str, ours: object, target: Target) -> tuple[str, object | None]:
    """(answer the target sends, resulting value or None when the negotiation must fail)."""
    row = TABLE[key]
    if row.function == "list":
        assert isinstance(ours, tuple)
        choice = next((item for item in ours if item in target.digests[key]), None)
        if choice is None:
            # A rejected digest ends the login: the target accepts none of ours.
            return "Reject", None
        return choice.value, choice
    if row.function in ("min", "max"):
        assert isinstance(ours, int)
        pick = min if row.function == "min" else max
        number = pick(ours, target.numbers[key])
        return (hex(number) if target.hex_numbers else str(number)), number
    assert isinstance(ours, bool)
    flag = (ours or target.flags[key]) if row.function == "or" else (ours and target.flags[key])
    return fmt(flag), flag


def receive_all(negotiator: Negotiator, rounds: list[list[tuple[str, str]]]) -> None:
    for round_ in rounds:
        negotiator.receive(round_)


# -- offer -------------------------------------------------------------------------------------


def test_default_offer_in_a_normal_session() -> None:
    assert normal().offer() == [
        ("HeaderDigest", "None,CRC32C"),
        ("DataDigest", "None,CRC32C"),
        ("MaxConnections", "1"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "20"),
        ("MaxOutstandingR2T", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("ErrorRecoveryLevel", "0"),
    ]


def test_discovery_offers_only_keys_relevant_there() -> None:
    offered = dict(discovery(OperationalProposal(initiator_alias="host-1")).offer())
    assert set(offered) == {*RELEVANT_IN_DISCOVERY, "MaxRecvDataSegmentLength", "InitiatorAlias"}
    assert offered["InitiatorAlias"] == "host-1"


def test_send_keys_selects_what_is_offered() -> None:
    proposal = OperationalProposal(
        header_digest=(Digest.CRC32C, Digest.NONE),
        send_keys=frozenset({"HeaderDigest", "MaxBurstLength"}),
    )
    negotiator = normal(proposal)
    assert negotiator.offer() == [("HeaderDigest", "CRC32C,None"), ("MaxBurstLength", "262144")]
    assert negotiator.pending == {"HeaderDigest", "MaxBurstLength"}


def test_offer_only_once() -> None:
    negotiator = normal()
    negotiator.offer()
    with pytest.raises(LocalProtocolError):
        negotiator.offer()


def test_self_settled_booleans_are_not_pending() -> None:
    # OR with Yes and AND with No decide the outcome alone, so the answer is optional.
    proposal = OperationalProposal(initial_r2t=True, immediate_data=False, data_pdu_in_order=False)
    negotiator = normal(proposal)
    negotiator.offer()
    assert "InitialR2T" not in negotiator.pending
    assert "ImmediateData" not in negotiator.pending
    assert "DataPDUInOrder" in negotiator.pending
    assert "DataSequenceInOrder" not in negotiator.pending


def test_target_proposal_before_offer_is_not_offered_again() -> None:
    negotiator = normal()
    assert negotiator.receive([("MaxBurstLength", "65536")]) == [("MaxBurstLength", "65536")]
    assert "MaxBurstLength" not in dict(negotiator.offer())


@pytest.mark.parametrize(
    "changes",
    [
        {"header_digest": ()},
        {"header_digest": (Digest.NONE, Digest.NONE)},
        {"data_digest": ("None",)},
        {"max_connections": 0},
        {"max_recv_data_segment_length": 511},
        {"max_recv_data_segment_length": 2**24},
        {"max_burst_length": 1024, "first_burst_length": 2048},
        {"default_time2wait": 3601},
        {"error_recovery_level": 3},
        {"max_outstanding_r2t": True},
        {"initial_r2t": 1},
        {"initiator_alias": "a\x00b"},
        {"initiator_alias": "x" * 256},
        {"send_keys": frozenset({"AuthMethod"})},
        {"send_keys": frozenset({"InitiatorAlias"})},
    ],
)
def test_invalid_proposals_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        OperationalProposal(**changes)  # type: ignore[arg-type]


# -- answers to our offer ----------------------------------------------------------------------


@settings(max_examples=300)
@given(proposals(), targets(), st.data())
def test_answers_give_the_rfc_result(
    proposal: OperationalProposal, target: Target, data: st.DataObject
) -> None:
    negotiator = normal(proposal)
    offered = dict(negotiator.offer())
    answers: list[tuple[str, str]] = []
    expected: dict[str, object] = {}
    failing = False
    for key in NEGOTIATED:
        ours = getattr(proposal, TABLE[key].field)
        assert offered[key] == fmt(ours)
        answer, result = expected_outcome(key, ours, target)
        if result is None:
            failing = True
        expected[TABLE[key].field] = result
        answers.append((key, answer))
    answers.append(("MaxRecvDataSegmentLength", "4096"))
    answers.append(("TargetPortalGroupTag", "7"))
    order = data.draw(st.permutations(answers))
    cut = data.draw(st.integers(0, len(order)))
    rounds = [order[:cut], order[cut:]]
    if failing:
        with pytest.raises(NegotiationError):
            receive_all(negotiator, rounds)
        return
    for round_ in rounds:
        assert negotiator.receive(round_) == []
    assert negotiator.pending == frozenset()
    result = negotiator.result()
    assert result == OperationalParameters(
        **expected,  # type: ignore[arg-type]
        max_recv_data_segment_length=proposal.max_recv_data_segment_length,
        target_max_recv_data_segment_length=4096,
        target_portal_group_tag=7,
    )
    assert result.first_burst_length <= result.max_burst_length


@settings(max_examples=300)
@given(proposals(), st.sampled_from(NEGOTIATED), st.data())
def test_answer_outside_our_offer_is_an_error(
    proposal: OperationalProposal, key: str, data: st.DataObject
) -> None:
    row = TABLE[key]
    ours = getattr(proposal, row.field)
    if row.function == "list":
        bad = data.draw(
            st.sampled_from(
                [d.value for d in Digest if d not in ours] + ["None,CRC32C", "MD5", "", "none"]
            )
        )
    elif row.function == "min":
        bad = str(data.draw(st.integers(ours + 1, row.high + 5)))  # above our offer or the range
    elif row.function == "max":
        bad = str(data.draw(st.integers(-1, ours - 1)))  # below our offer, or not a number
    elif row.function == "or":
        bad = "No" if ours else "maybe"
    else:
        bad = "Yes" if not ours else "YES"
    negotiator = normal(proposal)
    negotiator.offer()
    with pytest.raises(NegotiationError) as caught:
        negotiator.receive([(key, bad)])
    assert caught.value.key == key
    assert caught.value.value == bad
    assert key in str(caught.value)


def test_self_settled_boolean_may_be_answered_consistently() -> None:
    negotiator = normal(OperationalProposal(immediate_data=False))
    answers = full_answers(negotiator)
    negotiator.receive(answers)
    assert negotiator.result().immediate_data is False


def test_first_burst_above_max_burst_is_an_error() -> None:
    negotiator = normal()
    negotiator.offer()
    with pytest.raises(NegotiationError, match="FirstBurstLength=65536 exceeds") as caught:
        negotiator.receive([("MaxBurstLength", "8192"), ("FirstBurstLength", "65536")])
    assert caught.value.key == "FirstBurstLength"


def test_unanswered_keys_block_the_result() -> None:
    negotiator = normal()
    negotiator.offer()
    negotiator.receive([("HeaderDigest", "None")])
    assert "DataDigest" in negotiator.pending
    assert "HeaderDigest" not in negotiator.pending
    with pytest.raises(NegotiationError, match="unanswered"):
        negotiator.result()


def test_keys_never_offered_keep_their_defaults() -> None:
    negotiator = normal(OperationalProposal(send_keys=frozenset()))
    assert negotiator.offer() == []
    assert negotiator.result() == OperationalParameters()


# -- special answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("special", ["Reject", "NotUnderstood"])
def test_refusal_keeps_an_acceptable_default(special: str) -> None:
    negotiator = normal(OperationalProposal(header_digest=(Digest.CRC32C, Digest.NONE)))
    answers = dict(full_answers(negotiator))
    answers["MaxBurstLength"] = special
    if special == "NotUnderstood":
        # A target that does not know digests cannot use them either: None is safe.
        answers["HeaderDigest"] = special
    assert negotiator.receive(answers.items()) == []
    result = negotiator.result()
    expected = Digest.NONE if special == "NotUnderstood" else Digest.CRC32C
    assert result.header_digest is expected
    assert result.max_burst_length == 262144


@pytest.mark.parametrize("key", ["HeaderDigest", "DataDigest"])
@pytest.mark.parametrize(
    "offer", [(Digest.NONE,), (Digest.NONE, Digest.CRC32C), (Digest.CRC32C, Digest.NONE)]
)
def test_a_rejected_digest_ends_the_negotiation(key: str, offer: tuple[Digest, ...]) -> None:
    """A target that requires digests answers Reject to an offer it cannot take; falling back to
    None would give a session whose next PDU the target cannot read."""
    field = "header_digest" if key == "HeaderDigest" else "data_digest"
    negotiator = normal(OperationalProposal(**{field: offer}))  # type: ignore[arg-type]
    answers = dict(full_answers(negotiator))
    answers[key] = "Reject"
    with pytest.raises(NegotiationError, match=f"rejected {key}=") as caught:
        negotiator.receive(answers.items())
    assert (caught.value.key, caught.value.value) == (key, "Reject")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"header_digest": (Digest.CRC32C,)}, "HeaderDigest"),
        ({"max_burst_length": 65536}, "MaxBurstLength"),
        ({"default_time2wait": 10}, "DefaultTime2Wait"),
        ({"immediate_data": False}, "ImmediateData"),
    ],
)
@pytest.mark.parametrize("special", ["Reject", "NotUnderstood"])
def test_refusal_with_an_unacceptable_default_is_an_error(
    changes: dict[str, object], key: str, special: str
) -> None:
    negotiator = normal(OperationalProposal(**changes))  # type: ignore[arg-type]
    negotiator.offer()
    with pytest.raises(NegotiationError, match=r"default|accepts none") as caught:
        negotiator.receive([(key, special)])
    assert (caught.value.key, caught.value.value) == (key, special)


def test_irrelevant_is_accepted_for_keys_irrelevant_in_discovery() -> None:
    proposal = OperationalProposal(
        max_burst_length=8192,
        first_burst_length=4096,
        send_keys=frozenset({"MaxBurstLength", "FirstBurstLength", "HeaderDigest"}),
    )
    negotiator = discovery(proposal)
    negotiator.offer()
    negotiator.receive(
        [
            ("MaxBurstLength", "Irrelevant"),
            ("FirstBurstLength", "Irrelevant"),
            ("HeaderDigest", "None"),
        ]
    )
    result = negotiator.result()
    assert (result.max_burst_length, result.first_burst_length) == (262144, 65536)


@pytest.mark.parametrize(
    ("session", "key"),
    [
        (SessionType.NORMAL, "MaxBurstLength"),
        (SessionType.NORMAL, "HeaderDigest"),
        (SessionType.DISCOVERY, "HeaderDigest"),
        (SessionType.DISCOVERY, "ErrorRecoveryLevel"),
    ],
)
def test_irrelevant_where_the_rfc_does_not_allow_it_is_an_error(
    session: SessionType, key: str
) -> None:
    negotiator = Negotiator(OperationalProposal(send_keys=frozenset({key})), session_type=session)
    negotiator.offer()
    with pytest.raises(NegotiationError, match="Irrelevant") as caught:
        negotiator.receive([(key, "Irrelevant")])
    assert caught.value.key == key


def test_first_burst_irrelevant_with_initial_r2t_and_no_immediate_data() -> None:
    negotiator = normal(OperationalProposal(initial_r2t=True, immediate_data=False))
    answers = dict(full_answers(negotiator))
    answers["FirstBurstLength"] = "Irrelevant"
    negotiator.receive(answers.items())
    assert negotiator.result().first_burst_length == 65536


def test_first_burst_irrelevant_otherwise_is_an_error() -> None:
    negotiator = normal(OperationalProposal(initial_r2t=True, immediate_data=True))
    answers = dict(full_answers(negotiator))
    answers["FirstBurstLength"] = "Irrelevant"
    with pytest.raises(NegotiationError, match="InitialR2T=Yes and ImmediateData=No"):
        negotiator.receive(answers.items())


def test_first_burst_irrelevant_waits_for_a_pending_immediate_data() -> None:
    negotiator = normal(OperationalProposal(initial_r2t=True, immediate_data=True))
    negotiator.offer()
    assert negotiator.receive([("FirstBurstLength", "Irrelevant")]) == []
    with pytest.raises(NegotiationError, match="FirstBurstLength"):
        negotiator.receive([("ImmediateData", "Yes")])


# -- keys the target proposes ------------------------------------------------------------------


def our_preference(proposal: OperationalProposal, key: str) -> object:
    ours = getattr(proposal, TABLE[key].field)
    if key == "FirstBurstLength":
        ours = min(ours, proposal.max_burst_length)
    return ours


def admissible(row: Row, ours: object, value: object) -> bool:
    if row.function == "list":
        assert isinstance(ours, tuple)
        return value in ours
    if row.function in ("min", "max"):
        assert isinstance(value, int)
        assert isinstance(ours, int)
        return value <= ours if row.function == "min" else value >= ours
    if row.function == "or":
        return bool(value) or not ours
    return not value or bool(ours)


def expected_answer(row: Row, ours: object, value: str) -> str | None:
    """Our answer to a target proposal by the RFC rules; None when we must give up."""
    if row.function == "list":
        assert isinstance(ours, tuple)
        accepted = {d.value for d in ours}
        choice = next((item for item in value.split(",") if item in accepted), None)
        if choice is not None:
            return choice
    elif row.function in ("min", "max"):
        if value.isascii() and value.isdigit() and row.low <= int(value) <= row.high:
            pick = min if row.function == "min" else max
            return str(pick(int(value), ours))  # type: ignore[call-overload]
    elif value in ("Yes", "No"):
        flag = value == "Yes"
        return fmt((flag or ours) if row.function == "or" else (flag and ours))
    return "Reject" if admissible(row, ours, row.default) else None


def proposed_values(key: str) -> st.SearchStrategy[str]:
    row = TABLE[key]
    if row.function == "list":
        items = st.sampled_from(["None", "CRC32C", "MD5", "crc32c", ""])
        return st.lists(items, min_size=1, max_size=4).map(",".join)
    if row.function in ("min", "max"):
        return st.integers(row.low - 2, row.high + 2).map(str) | st.sampled_from(["", "0x", "z"])
    return st.sampled_from(["Yes", "No", "yes", ""])


@settings(max_examples=400)
@given(proposals(), st.sampled_from(NEGOTIATED), st.data())
def test_target_proposals_are_answered_by_the_result_function(
    proposal: OperationalProposal, key: str, data: st.DataObject
) -> None:
    value = data.draw(proposed_values(key))
    negotiator = normal(proposal)
    row = TABLE[key]
    ours = our_preference(proposal, key)
    answer = expected_answer(row, ours, value)
    if answer is None:
        with pytest.raises(NegotiationError) as caught:
            negotiator.receive([(key, value)])
        assert caught.value.key == key
        return
    assert negotiator.receive([(key, value)]) == [(key, answer)]
    offer = negotiator.offer()
    assert key not in dict(offer)
    assert negotiator.receive(echo(offer, negotiator.pending)) == []
    got = getattr(negotiator.result(), row.field)
    if answer == "Reject":
        assert got == row.default
    else:
        assert fmt(got) == answer


def test_target_burst_proposals_respect_each_other_whatever_their_order() -> None:
    negotiator = normal(OperationalProposal(max_burst_length=16384, first_burst_length=16384))
    answers = negotiator.receive([("FirstBurstLength", "65536"), ("MaxBurstLength", "8192")])
    # MaxBurstLength is settled first, so FirstBurstLength is answered within it; the order of
    # the answers still follows the target's.
    assert answers == [("FirstBurstLength", "8192"), ("MaxBurstLength", "8192")]


def test_discovery_answers_irrelevant_keys_with_irrelevant() -> None:
    negotiator = discovery()
    negotiator.offer()
    answers = negotiator.receive(
        [("MaxBurstLength", "1024"), ("InitialR2T", "No"), ("TaskReporting", "FastAbort")]
    )
    assert answers == [
        ("MaxBurstLength", "Irrelevant"),
        ("InitialR2T", "Irrelevant"),
        ("TaskReporting", "Irrelevant"),
    ]


def test_unknown_and_obsolete_keys() -> None:
    negotiator = normal()
    negotiator.offer()
    answers = negotiator.receive(
        [
            ("X-com.example.Feature", "Yes"),
            ("X#Registered", "1"),
            ("Frobnicate", "3"),
            ("OFMarker", "No"),
            ("IFMarkInt", "2048~8192"),
        ]
    )
    assert answers == [
        ("X-com.example.Feature", "NotUnderstood"),
        ("X#Registered", "NotUnderstood"),
        ("Frobnicate", "NotUnderstood"),
        ("OFMarker", "Reject"),
        ("IFMarkInt", "Reject"),
    ]


def test_rfc7143_keys_we_never_offer_are_still_answered() -> None:
    negotiator = normal()
    answers = negotiator.receive(
        [("TaskReporting", "FastAbort,RFC3720"), ("iSCSIProtocolLevel", "2")]
    )
    assert answers == [("TaskReporting", "RFC3720"), ("iSCSIProtocolLevel", "1")]


@pytest.mark.parametrize("special", ["Reject", "NotUnderstood", "Irrelevant"])
@pytest.mark.parametrize("key", ["MaxBurstLength", "X-com.example.Feature", "OFMarker"])
def test_special_values_as_proposals_are_errors(key: str, special: str) -> None:
    negotiator = normal()
    with pytest.raises(NegotiationError) as caught:
        negotiator.receive([(key, special)])
    assert (caught.value.key, caught.value.value) == (key, special)


# -- declarations and login keys ---------------------------------------------------------------


def test_declarations_are_recorded_not_answered() -> None:
    negotiator = normal()
    answers = negotiator.receive(
        [
            ("TargetPortalGroupTag", "0x0010"),
            ("TargetAlias", "storage array 1"),
            ("MaxRecvDataSegmentLength", "1024"),
            *full_answers(negotiator),
        ]
    )
    assert answers == []
    result = negotiator.result()
    assert result.target_portal_group_tag == 16
    assert result.target_alias == "storage array 1"
    assert result.target_max_recv_data_segment_length == 1024
    assert result.max_recv_data_segment_length == 262144


def test_undeclared_receive_length_is_the_default() -> None:
    negotiator = normal(OperationalProposal(send_keys=frozenset({"HeaderDigest"})))
    negotiator.offer()
    negotiator.receive([("HeaderDigest", "None")])
    result = negotiator.result()
    assert result.max_recv_data_segment_length == 8192
    assert result.target_max_recv_data_segment_length == 8192


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MaxRecvDataSegmentLength", "511"),
        ("MaxRecvDataSegmentLength", "16777216"),
        ("MaxRecvDataSegmentLength", "lots"),
        ("TargetPortalGroupTag", "65536"),
        ("TargetPortalGroupTag", "-1"),
    ],
)
def test_bad_declarations_are_errors(key: str, value: str) -> None:
    with pytest.raises(NegotiationError) as caught:
        normal().receive([(key, value)])
    assert (caught.value.key, caught.value.value) == (key, value)


def test_initiator_alias_from_the_target_is_rejected() -> None:
    assert normal().receive([("InitiatorAlias", "me")]) == [("InitiatorAlias", "Reject")]


def test_login_keys_are_left_alone() -> None:
    negotiator = normal()
    pairs = [(key, "whatever") for key in sorted(LOGIN_KEYS)]
    assert negotiator.receive(pairs) == []
    assert negotiator.result() == OperationalParameters()
    assert {"AuthMethod", "CHAP_C", "CHAP_R", "TargetName", "TargetAddress"} <= LOGIN_KEYS


# -- protocol violations -----------------------------------------------------------------------


def test_renegotiation_is_an_error() -> None:
    negotiator = normal()
    negotiator.offer()
    negotiator.receive([("MaxBurstLength", "8192")])
    with pytest.raises(NegotiationError, match="again") as caught:
        negotiator.receive([("MaxBurstLength", "8192")])
    assert caught.value.key == "MaxBurstLength"


def test_repeated_key_in_one_round_is_an_error() -> None:
    with pytest.raises(NegotiationError, match="twice"):
        normal().receive([("TargetAlias", "a"), ("TargetAlias", "b")])


known_keys = st.sampled_from(
    [
        *NEGOTIATED,
        *("MaxRecvDataSegmentLength", "TargetPortalGroupTag", "TargetAlias", "InitiatorAlias"),
        *("OFMarker", "TaskReporting", "iSCSIProtocolLevel", "X-a.b", "AuthMethod"),
    ]
)
odd_values = st.sampled_from(
    [
        *("Yes", "No", "None", "CRC32C", "None,CRC32C", "Reject", "Irrelevant", "NotUnderstood"),
        *("0", "1", "512", "65536", "0x10", "0bAQ==", "", "16777216", "-3"),
    ]
) | st.text(max_size=10)


@settings(max_examples=400)
@given(
    st.sampled_from(list(SessionType)),
    st.booleans(),
    st.lists(st.lists(st.tuples(known_keys, odd_values), max_size=8), max_size=3),
)
def test_any_target_input_ends_in_answers_or_a_protocol_error(
    session: SessionType, offer_first: bool, rounds: list[list[tuple[str, str]]]
) -> None:
    negotiator = Negotiator(OperationalProposal(), session_type=session)
    if offer_first:
        negotiator.offer()
    error: ProtocolError | None = None
    try:
        for round_ in rounds:
            answers = negotiator.receive(round_)
            assert {key for key, _ in answers} <= {key for key, _ in round_}
            assert not {key for key, _ in answers} & LOGIN_KEYS
            assert encode_text(answers).count(b"\x00") == len(answers)
        result = negotiator.result()
    except ProtocolError as exc:
        error = exc
    else:
        assert result.first_burst_length <= result.max_burst_length
    assert error is None or isinstance(error, NegotiationError)
