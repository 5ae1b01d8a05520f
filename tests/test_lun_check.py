"""The LUN check planner, fed synthetic answers built with protocol/scsi's encoders.

:class:`~pyiscsi_failover.lun_check.LunCheck` is pure: it hands out :class:`ScsiRequest`\\s and
judges :class:`~pyiscsi_failover.initiator.ScsiCompleted` events. A scripted logical unit
answers each request here; the tests check what is asked, how often, and the report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.initiator import ScsiCompleted
from pyiscsi_failover.lun_check import (
    MAX_RETRIES,
    LunCheck,
    LunInfo,
    LunReport,
    LunVerdict,
    ScsiRequest,
    Step,
)
from pyiscsi_failover.protocol.pdu import ScsiStatus
from pyiscsi_failover.protocol.scsi import (
    AddressingMode,
    Association,
    CodeSet,
    Designator,
    DesignatorType,
    PeripheralDeviceType,
    ScsiOpcode,
    SenseKey,
    cdb_inquiry,
    cdb_read_capacity_10,
    cdb_read_capacity_16,
    cdb_report_luns,
    cdb_test_unit_ready,
    encode_fixed_sense,
    encode_read_capacity_10,
    encode_read_capacity_16,
    encode_report_luns,
    encode_sam_lun,
    encode_standard_inquiry,
    encode_vpd_device_identification,
    lun_field,
)

# tgtd's LUN 1 of target 1 (PROTOCOL.md): its NAA 6 designator, and how Linux and udev show it.
TGT_NAA6 = bytes.fromhex("60000000000000000e00000000010001")
TGT_WWID = "naa.60000000000000000e00000000010001"
TGT_SCSI_ID = "360000000000000000e00000000010001"
START_STEPS = [
    Step.REPORT_LUNS,
    Step.INQUIRY,
    Step.DEVICE_ID,
    Step.TEST_UNIT_READY,
    Step.READ_CAPACITY_16,
    Step.TEST_UNIT_READY,  # the retry of the login's UNIT ATTENTION, sent ahead
]

Answer = Callable[[ScsiRequest, int], ScsiCompleted]


def good(data: bytes = b"") -> ScsiCompleted:
    return ScsiCompleted(itt=0, status=ScsiStatus.GOOD, data=data)


def check_condition(key: SenseKey, asc: int, ascq: int) -> ScsiCompleted:
    return ScsiCompleted(
        itt=0, status=ScsiStatus.CHECK_CONDITION, sense=encode_fixed_sense(key, asc, ascq)
    )


def status(value: ScsiStatus) -> ScsiCompleted:
    return ScsiCompleted(itt=0, status=value)


def healthy(luns: tuple[int, ...] = (0, 1)) -> dict[Step, ScsiCompleted]:
    """What tgtd's LUN 1 answers: a 1 GiB disk of 512-byte blocks with its NAA 6 WWID."""
    naa = Designator(
        code_set=CodeSet.BINARY,
        piv=False,
        association=Association.LOGICAL_UNIT,
        designator_type=DesignatorType.NAA,
        value=TGT_NAA6,
    )
    return {
        Step.REPORT_LUNS: good(encode_report_luns(encode_sam_lun(n) for n in luns)),
        Step.INQUIRY: good(
            encode_standard_inquiry(vendor="IET", product="VIRTUAL-DISK", revision="0001")
        ),
        Step.DEVICE_ID: good(encode_vpd_device_identification([naa])),
        Step.TEST_UNIT_READY: good(),
        Step.READ_CAPACITY_16: good(
            encode_read_capacity_16(last_lba=(1 << 21) - 1, block_length=512)
        ),
        Step.READ_CAPACITY_10: good(
            encode_read_capacity_10(last_lba=(1 << 21) - 1, block_length=512)
        ),
    }


def scripted(
    overrides: dict[Step, list[ScsiCompleted]] | None = None,
    base: dict[Step, ScsiCompleted] | None = None,
) -> Answer:
    """Answer attempt ``n`` of a step with ``overrides[step][n]`` while there is one, then with
    the healthy answer."""
    normal = healthy() if base is None else base
    plan = overrides or {}

    def answer(request: ScsiRequest, attempt: int) -> ScsiCompleted:
        script = plan.get(request.step, [])
        return script[attempt] if attempt < len(script) else normal[request.step]

    return answer


def run(check: LunCheck, answer: Answer) -> tuple[LunReport, list[ScsiRequest]]:
    """Drive ``check`` first in, first out; return its report and every request it made."""
    asked: list[ScsiRequest] = []
    pending = check.start()
    attempts: Counter[Step] = Counter()
    while pending:
        request = pending.pop(0)
        asked.append(request)
        assert check.report is None, "a report before every answer was in"
        event = answer(request, attempts[request.step])
        attempts[request.step] += 1
        pending += check.completed(request.step, event)
    assert check.done and check.report is not None
    return check.report, asked


def steps_asked(asked: list[ScsiRequest]) -> Counter[Step]:
    return Counter(request.step for request in asked)


# -- what is asked ----------------------------------------------------------------------------


def test_start_asks_all_five_and_a_spare_test_unit_ready_at_once() -> None:
    check = LunCheck(1)
    requests = check.start()
    assert [r.step for r in requests] == START_STEPS
    by_step = {r.step: r for r in requests}
    assert by_step[Step.REPORT_LUNS].lun == bytes(8)  # REPORT LUNS goes to LUN 0
    assert by_step[Step.REPORT_LUNS].cdb == cdb_report_luns()
    assert by_step[Step.INQUIRY].cdb == cdb_inquiry()
    assert by_step[Step.DEVICE_ID].cdb == cdb_inquiry(evpd=True, page=0x83)
    assert by_step[Step.TEST_UNIT_READY].cdb == cdb_test_unit_ready()
    assert by_step[Step.READ_CAPACITY_16].cdb == cdb_read_capacity_16()
    lun1 = bytes.fromhex("0001000000000000")
    assert all(r.lun == lun1 for r in requests if r.step is not Step.REPORT_LUNS)
    assert check.report is None and not check.done


def test_the_ok_path_reports_the_lun_info() -> None:
    report, asked = run(LunCheck(1), scripted())
    assert report.verdict is LunVerdict.OK
    assert report.info == LunInfo(
        wwid=TGT_WWID,
        wwid_udev=TGT_SCSI_ID,
        size_bytes=1 << 30,
        block_size=512,
        vendor="IET",
        product="VIRTUAL-DISK",
        revision="0001",
        device_type=0,
    )
    assert report.notes == ()
    assert "LUN 1 ready" in report.detail and "1.0 GiB" in report.detail
    assert TGT_WWID in report.detail
    assert steps_asked(asked) == Counter(START_STEPS)
    assert report.info.to_json() == {
        "wwid": TGT_WWID,
        "wwid_udev": TGT_SCSI_ID,
        "size_bytes": 1 << 30,
        "block_size": 512,
        "vendor": "IET",
        "product": "VIRTUAL-DISK",
        "revision": "0001",
        "device_type": 0,
    }


# -- a LUN that is not there -------------------------------------------------------------------


def test_report_luns_without_the_lun_is_lun_missing_naming_the_listed_ones() -> None:
    base = healthy(luns=(0, 2, 3))
    report, _ = run(LunCheck(1), scripted(base=base))
    assert report.verdict is LunVerdict.MISSING
    assert report.info is None
    assert "LUN 1 is not in REPORT LUNS" in report.detail
    assert "0, 2, 3" in report.detail


def test_an_empty_report_luns_says_none() -> None:
    base = healthy(luns=())
    report, _ = run(LunCheck(1), scripted(base=base))
    assert report.verdict is LunVerdict.MISSING and "lists none" in report.detail


@pytest.mark.parametrize(
    ("qualifier", "device_type", "words"),
    [
        (3, 0x1F, "no logical unit there"),  # tgtd's 0x7F for an unmapped LUN
        (1, 0x00, "no logical unit there"),  # supported, nothing connected now
        (0, PeripheralDeviceType.STORAGE_ARRAY_CONTROLLER, "storage array controller"),
        (0, PeripheralDeviceType.SEQUENTIAL_ACCESS, "sequential access"),
        (0, 0x15, "type 0x15"),  # a code SPC leaves unnamed
    ],
)
def test_inquiry_that_shows_no_disk_is_lun_missing(
    qualifier: int, device_type: int, words: str
) -> None:
    base = healthy()
    base[Step.INQUIRY] = good(
        encode_standard_inquiry(
            vendor="IET",
            product="Controller",
            revision="0001",
            peripheral_qualifier=qualifier,
            device_type=device_type,
        )
    )
    report, _ = run(LunCheck(1), scripted(base=base))
    assert report.verdict is LunVerdict.MISSING
    assert words in report.detail
    assert f"qualifier {qualifier}, type 0x{device_type:02x}" in report.detail


def test_logical_unit_not_supported_is_lun_missing() -> None:
    missing = check_condition(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
    report, asked = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: [missing] * 2}))
    assert report.verdict is LunVerdict.MISSING
    assert "TEST UNIT READY" in report.detail
    assert "ILLEGAL REQUEST 25/00" in report.detail
    assert steps_asked(asked)[Step.TEST_UNIT_READY] == 2  # the two sent at once, not retried


# -- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [Step.TEST_UNIT_READY, Step.REPORT_LUNS, Step.INQUIRY])
def test_unit_attention_is_retried_then_ok(step: Step) -> None:
    ua = check_condition(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    report, asked = run(LunCheck(1), scripted({step: [ua, ua]}))
    assert report.verdict is LunVerdict.OK
    assert steps_asked(asked)[step] == 3
    # A retry is the same command again.
    again = [r for r in asked if r.step is step]
    assert all(r == again[0] for r in again)


def test_the_login_unit_attention_costs_no_round_trip() -> None:
    """tgtd's UNIT ATTENTION on the first TEST UNIT READY: the spare one is its retry."""
    ua = check_condition(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    check = LunCheck(1)
    first = check.start()
    follow: list[ScsiRequest] = []
    answers = scripted({Step.TEST_UNIT_READY: [ua]})
    sent: Counter[Step] = Counter()
    for request in first:
        follow += check.completed(request.step, answers(request, sent[request.step]))
        sent[request.step] += 1
    assert follow == []
    assert check.report is not None and check.report.verdict is LunVerdict.OK


@pytest.mark.parametrize("ready_first", [True, False])
def test_of_two_test_unit_ready_answers_the_later_one_counts(ready_first: bool) -> None:
    becoming = check_condition(SenseKey.NOT_READY, 0x04, 0x01)
    script = [good(), becoming] if ready_first else [becoming, good()]
    report, asked = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: script}))
    assert steps_asked(asked)[Step.TEST_UNIT_READY] == 2
    if ready_first:
        assert report.verdict is LunVerdict.NOT_READY and "04/01" in report.detail
    else:
        assert report.verdict is LunVerdict.OK, report


def test_unit_attention_exhausted_is_lun_not_ready() -> None:
    ua = check_condition(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    report, asked = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: [ua] * 50}))
    assert report.verdict is LunVerdict.NOT_READY
    assert steps_asked(asked)[Step.TEST_UNIT_READY] == MAX_RETRIES + 1
    assert "UNIT ATTENTION 29/00" in report.detail
    assert f"after {MAX_RETRIES} retries" in report.detail


@pytest.mark.parametrize("busy", [ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL])
def test_busy_and_task_set_full_are_retried(busy: ScsiStatus) -> None:
    report, asked = run(LunCheck(1), scripted({Step.READ_CAPACITY_16: [status(busy)] * 3}))
    assert report.verdict is LunVerdict.OK
    assert steps_asked(asked)[Step.READ_CAPACITY_16] == 4
    assert report.info is not None and report.info.size_bytes == 1 << 30


@pytest.mark.parametrize("busy", [ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL])
def test_busy_forever_is_bounded(busy: ScsiStatus) -> None:
    report, asked = run(LunCheck(1), scripted({Step.INQUIRY: [status(busy)] * 50}))
    assert steps_asked(asked)[Step.INQUIRY] == MAX_RETRIES + 1
    assert report.verdict is LunVerdict.ERROR
    assert busy.name.replace("_", " ") in report.detail


# -- not ready, standby, reservations --------------------------------------------------------------


@pytest.mark.parametrize(
    ("ascq", "words"),
    [
        (0x0B, "NOT READY 04/0B: logical unit not accessible, target port in standby state"),
        (0x0C, "NOT READY 04/0C: logical unit not accessible, target port in unavailable state"),
    ],
)
def test_alua_standby_or_unavailable_is_lun_standby(ascq: int, words: str) -> None:
    sense = check_condition(SenseKey.NOT_READY, 0x04, ascq)
    report, asked = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: [sense] * 2}))
    assert report.verdict is LunVerdict.STANDBY
    assert words in report.detail
    assert steps_asked(asked)[Step.TEST_UNIT_READY] == 2


def test_becoming_ready_is_lun_not_ready_with_the_sense_described() -> None:
    sense = check_condition(SenseKey.NOT_READY, 0x04, 0x01)
    report, _ = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: [sense] * 2}))
    assert report.verdict is LunVerdict.NOT_READY
    assert report.detail == (
        "LUN 1: TEST UNIT READY: CHECK CONDITION, "
        "NOT READY 04/01: logical unit is in process of becoming ready"
    )


def test_standby_outranks_not_ready_and_missing_outranks_both() -> None:
    standby = check_condition(SenseKey.NOT_READY, 0x04, 0x0B)
    becoming = check_condition(SenseKey.NOT_READY, 0x04, 0x01)
    missing = check_condition(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
    report, _ = run(
        LunCheck(1),
        scripted({Step.TEST_UNIT_READY: [standby] * 2, Step.READ_CAPACITY_16: [becoming]}),
    )
    assert report.verdict is LunVerdict.STANDBY
    report, _ = run(
        LunCheck(1), scripted({Step.TEST_UNIT_READY: [standby] * 2, Step.INQUIRY: [missing]})
    )
    assert report.verdict is LunVerdict.MISSING


@pytest.mark.parametrize("step", [Step.TEST_UNIT_READY, Step.READ_CAPACITY_16])
def test_reservation_conflict_is_a_note_not_a_failure(step: Step) -> None:
    conflict = status(ScsiStatus.RESERVATION_CONFLICT)
    report, asked = run(LunCheck(1), scripted({step: [conflict]}))
    assert report.verdict is LunVerdict.OK
    assert len(report.notes) == 1 and "reservation conflict" in report.notes[0]
    assert step.value in report.notes[0]
    assert steps_asked(asked)[step] == START_STEPS.count(step)
    assert report.info is not None
    if step is Step.READ_CAPACITY_16:
        assert report.info.size_bytes is None and "unknown size" in report.detail


def test_a_target_failure_is_lun_error() -> None:
    failed = ScsiCompleted(itt=0, status=None, response=1)
    report, _ = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: [failed] * 2}))
    assert report.verdict is LunVerdict.ERROR
    assert "iSCSI response 0x01" in report.detail


# -- READ CAPACITY fallback, VPD 0x83, malformed replies ----------------------------------------


@pytest.mark.parametrize("asc", [0x20, 0x24])
def test_read_capacity_16_unknown_falls_back_to_10(asc: int) -> None:
    base = healthy()
    base[Step.READ_CAPACITY_10] = good(encode_read_capacity_10(last_lba=2047, block_length=4096))
    refused = check_condition(SenseKey.ILLEGAL_REQUEST, asc, 0x00)
    report, asked = run(LunCheck(1), scripted({Step.READ_CAPACITY_16: [refused]}, base=base))
    assert report.verdict is LunVerdict.OK, report.detail
    position = [r.step for r in asked].index(Step.READ_CAPACITY_16)
    fallback = [r for r in asked if r.step is Step.READ_CAPACITY_10]
    assert len(fallback) == 1 and asked.index(fallback[0]) > position
    assert fallback[0].cdb == cdb_read_capacity_10()
    assert fallback[0].cdb.opcode is ScsiOpcode.READ_CAPACITY_10
    assert fallback[0].lun == lun_field(1)
    assert report.info is not None
    assert (report.info.size_bytes, report.info.block_size) == (2048 * 4096, 4096)


def test_read_capacity_10_too_small_for_the_lu_is_noted() -> None:
    base = healthy()
    base[Step.READ_CAPACITY_10] = good(
        encode_read_capacity_10(last_lba=0xFFFFFFFF, block_length=512)
    )
    refused = check_condition(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
    report, _ = run(LunCheck(1), scripted({Step.READ_CAPACITY_16: [refused]}, base=base))
    assert report.verdict is LunVerdict.OK
    assert report.info is not None and report.info.size_bytes is None
    assert any("needs (16)" in note for note in report.notes)


def test_read_capacity_16_failing_otherwise_is_not_a_fallback() -> None:
    medium = check_condition(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
    report, asked = run(LunCheck(1), scripted({Step.READ_CAPACITY_16: [medium]}))
    assert Step.READ_CAPACITY_10 not in steps_asked(asked)
    assert report.verdict is LunVerdict.ERROR
    assert "MEDIUM ERROR 11/00" in report.detail


def test_no_vpd_page_0x83_is_ok_without_a_wwid() -> None:
    refused = check_condition(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    report, _ = run(LunCheck(1), scripted({Step.DEVICE_ID: [refused]}))
    assert report.verdict is LunVerdict.OK
    assert report.info is not None
    assert report.info.wwid is None and report.info.wwid_udev is None
    assert report.info.size_bytes == 1 << 30
    assert len(report.notes) == 1 and "no WWID" in report.notes[0]
    assert "INVALID FIELD IN CDB".lower() in report.notes[0].lower()
    assert "no WWID" in report.detail


@pytest.mark.parametrize(
    ("step", "payload"),
    [
        (Step.INQUIRY, b"\x00\x00"),  # not even the 5-byte header
        (Step.REPORT_LUNS, bytes([0, 0, 0, 5, 0, 0, 0, 0])),  # list length not a multiple of 8
        (Step.READ_CAPACITY_16, bytes(12)),  # block length 0
        (Step.READ_CAPACITY_16, bytes(4)),  # cut short
        (Step.DEVICE_ID, bytes([0, 0x80, 0, 0])),  # another VPD page
    ],
    ids=["inquiry-short", "report-luns-length", "rc16-zero-block", "rc16-short", "vpd-page"],
)
def test_a_malformed_reply_is_lun_error(step: Step, payload: bytes) -> None:
    report, _ = run(LunCheck(1), scripted({step: [good(payload)]}))
    assert report.verdict is LunVerdict.ERROR
    assert step.value in report.detail and "malformed" in report.detail


def test_sense_that_cannot_be_parsed_is_still_judged() -> None:
    garbled = ScsiCompleted(itt=0, status=ScsiStatus.CHECK_CONDITION, sense=b"\x00\x01")
    report, asked = run(LunCheck(1), scripted({Step.TEST_UNIT_READY: [garbled] * 2}))
    assert report.verdict is LunVerdict.ERROR
    assert "CHECK CONDITION" in report.detail
    assert steps_asked(asked)[Step.TEST_UNIT_READY] == 2


# -- LUN addressing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lun", "mode", "field"),
    [
        (1, AddressingMode.SAM, "0001000000000000"),
        (256, "SAM2", "4100000000000000"),
        (255, "SAM2", "00ff000000000000"),
        (5, "SAM3-flat", "4005000000000000"),
        (256, "SAM", "0100000000000000"),
        (256, "transparent", "0100000000000000"),
    ],
)
def test_addressing_modes_set_the_lun_field(lun: int, mode: str, field: str) -> None:
    check = LunCheck(lun, mode)  # type: ignore[arg-type]
    assert check.lun == bytes.fromhex(field)
    requests = check.start()
    assert {r.lun for r in requests if r.step is not Step.REPORT_LUNS} == {bytes.fromhex(field)}
    assert next(r for r in requests if r.step is Step.REPORT_LUNS).lun == bytes(8)


def test_tgt_lun_256_is_found_with_sam2_and_missed_with_sam() -> None:
    base = healthy(luns=(0, 256))  # tgtd reports LUN 256 flat: 41 00 ...
    report, _ = run(LunCheck(256, "SAM2"), scripted(base=base))  # type: ignore[arg-type]
    assert report.verdict is LunVerdict.OK
    report, _ = run(LunCheck(256), scripted(base=base))
    assert report.verdict is LunVerdict.MISSING
    assert "LUN 256 is not in REPORT LUNS" in report.detail


@pytest.mark.parametrize(
    ("lun", "mode"),
    [(16384, "SAM2"), (16384, "SAM3-flat"), (-1, "SAM"), (1 << 64, "SAM"), (1, "SAM4")],
)
def test_a_lun_the_mode_cannot_address_is_a_local_error(lun: int, mode: str) -> None:
    with pytest.raises(LocalProtocolError):
        LunCheck(lun, mode)  # type: ignore[arg-type]


def test_an_answer_for_a_step_not_asked_is_a_local_error() -> None:
    check = LunCheck(1)
    with pytest.raises(LocalProtocolError):
        check.completed(Step.TEST_UNIT_READY, good())
    check.start()
    check.completed(Step.TEST_UNIT_READY, good())
    check.completed(Step.TEST_UNIT_READY, good())  # the spare one
    with pytest.raises(LocalProtocolError):
        check.completed(Step.TEST_UNIT_READY, good())  # answered three times
    with pytest.raises(LocalProtocolError):
        check.completed(Step.READ_CAPACITY_10, good())  # never asked


# -- any order, any mix of retryable answers ------------------------------------------------------

RETRYABLE = [
    status(ScsiStatus.BUSY),
    status(ScsiStatus.TASK_SET_FULL),
    check_condition(SenseKey.UNIT_ATTENTION, 0x29, 0x00),
    check_condition(SenseKey.UNIT_ATTENTION, 0x2A, 0x06),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fallback=st.booleans())
def test_any_order_and_mix_of_retryable_answers_ends_with_one_report(
    data: st.DataObject, fallback: bool
) -> None:
    check = LunCheck(1)
    answers = healthy()
    in_flight = check.start()
    asked = list(in_flight)
    answered: Counter[Step] = Counter()
    retried_out: set[Step] = set()
    while in_flight:
        assert check.report is None
        request = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1), label="next"))
        choice = data.draw(st.integers(0, len(RETRYABLE)), label="answer")
        if choice:
            event = RETRYABLE[choice - 1]
            if answered[request.step] == MAX_RETRIES:
                retried_out.add(request.step)
        elif request.step is Step.READ_CAPACITY_16 and fallback:
            event = check_condition(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
        else:
            event = answers[request.step]
        answered[request.step] += 1
        follow = check.completed(request.step, event)
        if data.draw(st.booleans(), label="digest now"):
            check.digest()  # what the transport does while it waits: same report in the end
        assert len(follow) <= 1
        asked += follow
        in_flight += follow
        assert check.done is (check.report is not None)
    report = check.report
    assert report is not None
    counts = steps_asked(asked)
    assert all(n <= MAX_RETRIES + 1 for n in counts.values()), counts
    assert set(counts) == set(START_STEPS) | (
        {Step.READ_CAPACITY_10} if fallback and Step.READ_CAPACITY_16 not in retried_out else set()
    )
    # Exhausting the retries of anything but VPD 0x83 (which only costs the WWID) fails it.
    failing = retried_out - {Step.DEVICE_ID}
    if failing:
        assert report.verdict in (LunVerdict.NOT_READY, LunVerdict.ERROR), report
    else:
        assert report.verdict is LunVerdict.OK, report
        assert report.info is not None
        assert (report.info.wwid is None) is (Step.DEVICE_ID in retried_out)


def test_abandon_ends_the_check_as_a_lun_error() -> None:
    """A target's async logout request ends the check cleanly: one report, nothing in flight."""
    check = LunCheck(1)
    check.start()
    check.abandon("the target sent an async request logout")
    assert check.done and check.report is not None
    assert check.report.verdict is LunVerdict.ERROR
    assert "check not finished: the target sent an async request logout" in check.report.detail
    with pytest.raises(LocalProtocolError):
        check.completed(Step.INQUIRY, ScsiCompleted(itt=1, status=ScsiStatus.GOOD))


@pytest.mark.parametrize(
    ("lun", "hinted"), [(256, True), (16383, True), (255, False), (20000, False)]
)
def test_sam2_hint_only_where_flat_addressing_could_name_the_lun(lun: int, hinted: bool) -> None:
    """tgt lists LUN 256 flat-addressed (41 00): with plain SAM the check hints at SAM2, but only
    for LUNs flat addressing can hold (256..16383); a larger LUN is simply missing, no crash."""
    # encode_sam_lun lists LUNs >= 256 flat-addressed, as tgt does.
    listed = (0, 1, lun) if hinted else (0, 1)
    report, _ = run(LunCheck(lun), scripted(base=healthy(luns=listed)))
    assert report.verdict is LunVerdict.MISSING
    assert ("addressing_mode 'SAM2'?" in report.detail) is hinted
