"""Tests for pyiscsi_failover.connection_info: shapes, order, validation corpus, secrets, fuzz."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pyiscsi_failover.connection_info import (
    MAX_INPUT_BYTES,
    MAX_LUN,
    AddressingMode,
    Candidate,
    ConnectionInfo,
    build_connection_info,
    format_provider_location,
    parse_connection_info,
    parse_provider_location,
    read_limited,
    redacted,
)
from pyiscsi_failover.credentials import MASK, ChapCredentials, Secret
from pyiscsi_failover.errors import ConnectionInfoError, ISCSIError
from pyiscsi_failover.names import Portal, validate_iscsi_name
from pyiscsi_failover.protocol import scsi

DATA = Path(__file__).parent / "data"
GOOD_DIR = DATA / "connection_info"
BAD_DIR = DATA / "bad_connection_info"
GOOD_EXPECTED: dict[str, dict[str, Any]] = json.loads((GOOD_DIR / "expected.json").read_text())
BAD_EXPECTED: dict[str, str] = json.loads((BAD_DIR / "expected.json").read_text())

#: Passwords planted in the data files; none may ever show up in a message, repr or log copy.
PLANTED = (
    "S3cr3t-Corpus-Pa55",
    "Anoth3r-Corpus-Pa55",
    "987654321987",
    "S3cr3t-Good-Pa55",
    "Mutu4l-Good-Pa55",
    "D1sc0very-Good-Pa55",
)

IQN = "iqn.2010-10.org.openstack:volume-1"
IQN2 = "iqn.2010-10.org.openstack:volume-2"


def simple(**extra: object) -> dict[str, object]:
    data: dict[str, object] = {"target_portal": "10.0.1.2:3260", "target_iqn": IQN, "target_lun": 1}
    data.update(extra)
    return {"driver_volume_type": "iscsi", "data": data}


def triples(info: ConnectionInfo) -> list[tuple[str, int, str, int]]:
    return [(str(c.portal), c.portal.port, c.iqn, c.lun) for c in info.candidates]


def creds(username: str, secret: str | bytes) -> ChapCredentials:
    return ChapCredentials(username, Secret(secret))


def assert_no_planted_secret(*texts: str) -> None:
    for text in texts:
        for secret in PLANTED:
            assert secret not in text


# --------------------------------------------------------------------------------------------
# Good examples


@pytest.mark.parametrize("name", sorted(GOOD_EXPECTED))
def test_good_example(name: str) -> None:
    expected = GOOD_EXPECTED[name]
    info = parse_connection_info((GOOD_DIR / name).read_bytes())
    got = [[c.portal.host, c.portal.port, c.portal.tpgt, c.iqn, c.lun] for c in info.candidates]
    assert got == expected["candidates"]
    assert [c.index for c in info.candidates] == list(range(len(info.candidates)))
    assert info.main is info.candidates[0]
    assert info.alternatives == info.candidates[1:]
    assert info.source == expected["source"]
    assert isinstance(info.addressing_mode, AddressingMode)
    assert info.addressing_mode.value == expected["addressing_mode"]
    for field in ("chap", "target_chap", "discovery_chap", "discovery_target_chap"):
        creds = getattr(info, field)
        if expected[field] is None:
            assert creds is None
        else:
            assert creds is not None
            assert [creds.username, creds.secret.reveal_str()] == expected[field]


def test_good_examples_are_all_listed() -> None:
    files = {p.name for p in GOOD_DIR.glob("*.json")} - {"expected.json"}
    assert files == set(GOOD_EXPECTED)


@pytest.mark.parametrize("name", sorted(GOOD_EXPECTED))
def test_good_example_same_from_text_bytes_mapping_and_data(name: str) -> None:
    raw = (GOOD_DIR / name).read_bytes()
    document = json.loads(raw)
    from_bytes = parse_connection_info(raw)
    assert parse_connection_info(raw.decode()) == from_bytes
    assert parse_connection_info(document) == from_bytes
    if "data" in document:
        assert parse_connection_info(document["data"]) == from_bytes
        assert parse_connection_info(json.dumps(document["data"]).encode()) == from_bytes


@pytest.mark.parametrize("name", sorted(GOOD_EXPECTED))
def test_good_example_never_shows_secrets(name: str) -> None:
    raw = (GOOD_DIR / name).read_bytes()
    info = parse_connection_info(raw)
    assert_no_planted_secret(repr(info), str(info), json.dumps(redacted(json.loads(raw))))


def test_spec_example_order_and_main() -> None:
    info = parse_connection_info((GOOD_DIR / "spec_example.json").read_text())
    assert info.source == "alternatives"
    assert str(info.main.portal) == "10.0.1.2:3260"
    assert info.main.iqn == "iqn.2014-02.org.example:vol1-1"
    assert info.main.lun == 1
    assert [(str(c.portal), c.lun) for c in info.alternatives] == [
        ("10.0.2.2:3260", 2),
        ("10.0.3.2:3260", 3),
    ]


def test_unused_keys_are_ignored() -> None:
    base = parse_connection_info(simple())
    noisy = parse_connection_info(
        simple(
            volume_id="v",
            encrypted=True,
            qos_specs={"a": [1, {"b": None}]},
            access_mode="ro",
            target_discovered=True,
            discard=None,
            provider_location=12,
            **{"unknown-key": object()},
        )
    )
    assert noisy == base


def test_null_means_absent_for_optional_keys() -> None:
    info = parse_connection_info(simple(target_lun=None, auth_method=None, target_luns=None))
    assert info.main.lun == 0
    assert info.chap is None


def test_alternative_and_multipath_union_order() -> None:
    data = simple(
        target_alternative_portals=["10.0.3.2:3260"],
        target_portals=["10.0.4.2:3260", "10.0.3.2:3260", "10.0.1.2:3260", "10.0.5.2:3260"],
        target_iqns=[IQN] * 4,
        target_luns=[1] * 4,
    )
    info = parse_connection_info(data)
    assert [str(c.portal) for c in info.candidates] == [
        "10.0.1.2:3260",
        "10.0.3.2:3260",
        "10.0.4.2:3260",
        "10.0.5.2:3260",
    ]
    assert info.source == "alternatives"


def test_tpgt_does_not_make_a_new_candidate_and_first_is_kept() -> None:
    info = parse_connection_info(
        simple(target_portal="10.0.1.2:3260,5", target_alternative_portals=["10.0.1.2:3260,6"])
    )
    assert len(info.candidates) == 1
    assert info.main.portal.tpgt == 5


def test_chap_applies_to_all_candidates_and_masks_in_repr() -> None:
    info = parse_connection_info(
        simple(
            target_alternative_portals=["10.0.2.2"],
            auth_method="CHAP",
            auth_username="alice",
            auth_password="S3cr3t-Good-Pa55",
        )
    )
    assert info.chap == ChapCredentials("alice", Secret("S3cr3t-Good-Pa55"))
    assert len(info.candidates) == 2
    assert MASK in repr(info)
    assert_no_planted_secret(repr(info), repr(info.chap), f"{info}")


def test_auth_method_none_ignores_credentials_like_os_brick() -> None:
    info = parse_connection_info(simple(auth_method="none", auth_username=5, auth_password=[]))
    assert info.chap is None


# --------------------------------------------------------------------------------------------
# The bad corpus


def test_bad_corpus_is_big_enough_and_complete() -> None:
    files = {p.name for p in BAD_DIR.glob("*.json")} - {"expected.json"}
    assert files == set(BAD_EXPECTED)
    assert len(files) >= 40


@pytest.mark.parametrize("name", sorted(BAD_EXPECTED))
def test_bad_corpus(name: str) -> None:
    key = BAD_EXPECTED[name]
    with pytest.raises(ConnectionInfoError) as caught:
        parse_connection_info((BAD_DIR / name).read_bytes())
    exc = caught.value
    assert exc.key == key
    assert key in str(exc)
    assert isinstance(exc, ValueError)
    assert isinstance(exc, ISCSIError)
    assert_no_planted_secret(str(exc), repr(exc), str(exc.args))
    # The JSON decoder's exception holds the whole text (passwords too): it must not be kept.
    assert not isinstance(exc.__context__, json.JSONDecodeError)
    assert not isinstance(exc.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize("name", sorted(BAD_EXPECTED))
def test_bad_corpus_as_mapping_gives_same_key(name: str) -> None:
    try:
        document = json.loads((BAD_DIR / name).read_bytes())
    except (ValueError, RecursionError):
        return  # only meaningful for files that are valid JSON
    if BAD_EXPECTED[name] == "connection_info" and isinstance(document, Mapping):
        return  # JSON-level refusals (NaN, duplicate keys) json.loads lets through
    if name.startswith("duplicate_"):
        return  # json.loads kept the last duplicate, which is valid on its own
    with pytest.raises(ConnectionInfoError) as caught:
        parse_connection_info(document)
    assert caught.value.key == BAD_EXPECTED[name]


def test_error_shows_offending_value() -> None:
    with pytest.raises(ConnectionInfoError, match=r"target_alternative_portals\[1\].*70000"):
        parse_connection_info(simple(target_alternative_portals=["10.0.2.2", "10.0.3.2:70000"]))
    with pytest.raises(ConnectionInfoError, match=r"target_lun.*16384"):
        parse_connection_info(simple(target_lun=16384))


def test_wrong_top_level_types() -> None:
    for value in (None, 3, 1.5, [simple()], object()):
        with pytest.raises(ConnectionInfoError) as caught:
            parse_connection_info(value)  # type: ignore[arg-type]
        assert caught.value.key == "connection_info"


def test_lun_boundaries() -> None:
    assert parse_connection_info(simple(target_lun=0)).main.lun == 0
    assert parse_connection_info(simple(target_lun=MAX_LUN)).main.lun == MAX_LUN
    assert parse_connection_info(simple(target_lun="07")).main.lun == 7
    for bad in (-1, MAX_LUN + 1, True, False, 1.0, "", " 1", "1 ", "٣", "0x1", "123456"):
        with pytest.raises(ConnectionInfoError) as caught:
            parse_connection_info(simple(target_lun=bad))
        assert caught.value.key == "target_lun"


# --------------------------------------------------------------------------------------------
# addressing_mode


def test_addressing_mode_is_one_enum_shared_with_protocol_scsi() -> None:
    """One class, in a light module that neither connection_info nor protocol.scsi must load
    the other (or the PDU models) for."""
    assert AddressingMode is scsi.AddressingMode
    assert [m.value for m in AddressingMode] == ["SAM", "SAM2", "SAM3-flat", "transparent"]


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [
        ("SAM", AddressingMode.SAM),
        ("SAM2", AddressingMode.SAM2),
        ("SAM3-flat", AddressingMode.SAM3_FLAT),
        ("transparent", AddressingMode.TRANSPARENT),
    ],
)
def test_addressing_mode_spellings_as_os_brick_has_them(
    spelling: str, mode: AddressingMode
) -> None:
    info = parse_connection_info(simple(addressing_mode=spelling, target_alternative_portals=["x"]))
    assert info.addressing_mode is mode
    assert len(info.candidates) == 2  # one mode for every candidate, kept on the ConnectionInfo
    assert parse_connection_info(json.dumps(simple(addressing_mode=spelling))) == (
        parse_connection_info(simple(addressing_mode=spelling))
    )


def test_addressing_mode_absent_or_null_is_sam() -> None:
    assert parse_connection_info(simple()).addressing_mode is AddressingMode.SAM
    assert parse_connection_info(simple(addressing_mode=None)).addressing_mode is AddressingMode.SAM


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("sam2", "'sam2'"),
        ("SAM3-FLAT", "'SAM3-FLAT'"),
        ("SAM-2", "'SAM-2'"),
        ("", "''"),
        (" SAM", "' SAM'"),
        ("flat", "'flat'"),
        (2, "2"),
        (True, "True"),
        (["SAM2"], "a list of 1 items"),
        ({"mode": "SAM2"}, "a dict"),
    ],
)
def test_addressing_mode_bad_value_names_key_and_value(value: object, shown: str) -> None:
    """os-brick would treat an unknown mode as SAM; a silent fallback here would wait for the
    wrong by-path name, so it is refused."""
    with pytest.raises(ConnectionInfoError) as caught:
        parse_connection_info(simple(addressing_mode=value))
    assert caught.value.key == "addressing_mode"
    message = str(caught.value)
    assert message.startswith("addressing_mode: ")
    assert shown in message
    assert "'SAM', 'SAM2', 'SAM3-flat', 'transparent'" in message


def test_addressing_mode_case_slip_gets_a_hint() -> None:
    with pytest.raises(ConnectionInfoError, match=r"did you mean 'SAM3-flat'\?"):
        parse_connection_info(simple(addressing_mode="sam3-flat"))
    with pytest.raises(ConnectionInfoError) as caught:
        parse_connection_info(simple(addressing_mode="SAM-2"))
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize("mode", list(AddressingMode))
@pytest.mark.parametrize("lun", [0, 1, 255, 256, MAX_LUN])
def test_every_accepted_lun_is_a_single_level_lun_in_every_mode(
    lun: int, mode: AddressingMode
) -> None:
    """The range check is the same in every mode because every mode can encode all of it."""
    info = parse_connection_info(simple(target_lun=lun, addressing_mode=mode.value))
    field = scsi.lun_field(info.main.lun, info.addressing_mode)
    decoded = scsi.decode_sam_lun(field)
    assert decoded.method in (scsi.LunAddressMethod.PERIPHERAL, scsi.LunAddressMethod.FLAT)
    assert not any(field[2:])  # levels 2-4 empty
    flat = mode is AddressingMode.SAM3_FLAT or (mode is AddressingMode.SAM2 and lun >= 256)
    assert (decoded.method is scsi.LunAddressMethod.FLAT) is flat
    if flat or lun < 256:
        assert decoded.number == lun


def test_tgt_lun_256_with_sam2_is_flat_lun_256() -> None:
    info = parse_connection_info((GOOD_DIR / "addressing_mode_sam2_lun_256.json").read_bytes())
    for candidate in info.candidates:
        assert scsi.lun_for_addressing(candidate.lun, info.addressing_mode) == 16640
        assert scsi.lun_field(candidate.lun, info.addressing_mode) == bytes.fromhex(
            "4100000000000000"
        )


@pytest.mark.parametrize("mode", list(AddressingMode))
def test_a_lun_with_the_flat_bit_already_set_is_refused_with_a_hint(mode: AddressingMode) -> None:
    """os-brick would pass 16640 through under SAM; we want LUN 256 and SAM2 instead."""
    with pytest.raises(ConnectionInfoError) as caught:
        parse_connection_info(simple(target_lun=16640, addressing_mode=mode.value))
    assert caught.value.key == "target_lun"
    assert "16640" in str(caught.value)
    assert "flat-addressed LUN 256 give 256 with addressing_mode 'SAM2' or 'SAM3-flat'" in str(
        caught.value
    )
    with pytest.raises(
        ConnectionInfoError, match=r"LUN 1 give 1 with addressing_mode 'SAM3-flat'$"
    ):
        parse_connection_info(simple(target_lun=16385, addressing_mode=mode.value))
    with pytest.raises(ConnectionInfoError) as caught:
        parse_connection_info(simple(target_lun=32768, addressing_mode=mode.value))
    assert "flat-addressed" not in str(caught.value)


def test_connection_info_model_takes_and_normalises_the_mode() -> None:
    a = Candidate(index=0, portal=Portal(host="10.0.1.2"), iqn=IQN, lun=256)
    assert ConnectionInfo(candidates=(a,), source="single").addressing_mode is AddressingMode.SAM
    spelled = ConnectionInfo(
        candidates=(a,),
        source="single",
        addressing_mode="SAM2",  # type: ignore[arg-type]
    )
    assert spelled.addressing_mode is AddressingMode.SAM2
    other_class = ConnectionInfo(
        candidates=(a,),
        source="single",
        addressing_mode=scsi.AddressingMode.SAM3_FLAT,
    )
    assert other_class.addressing_mode is AddressingMode.SAM3_FLAT
    for bad in ("sam2", None, 1):
        with pytest.raises(ConnectionInfoError) as caught:
            ConnectionInfo(candidates=(a,), source="single", addressing_mode=bad)  # type: ignore[arg-type]
        assert caught.value.key == "addressing_mode"


def test_addressing_mode_is_not_redacted() -> None:
    built = build_connection_info(
        "10.0.1.2", IQN, 256, auth=creds("alice", "S3cr3t-Good-Pa55"), addressing_mode="SAM2"
    )
    shown = redacted(built)
    assert isinstance(shown, dict)
    assert shown["data"]["addressing_mode"] == "SAM2"
    assert shown["data"]["auth_password"] == MASK


# --------------------------------------------------------------------------------------------
# provider_location


def test_provider_location_example() -> None:
    info = parse_provider_location(
        "10.0.1.2:3260;10.0.2.2:3260,1 iqn.2010-10.org.openstack:volume-1 1"
    )
    assert info.source == "provider_location"
    assert [(c.index, c.portal, c.iqn, c.lun) for c in info.candidates] == [
        (0, Portal(host="10.0.1.2", port=3260, tpgt=1), IQN, 1),
        (1, Portal(host="10.0.2.2", port=3260, tpgt=1), IQN, 1),
    ]
    assert info.chap is None
    assert format_provider_location(info) == (
        "10.0.1.2:3260;10.0.2.2:3260,1 iqn.2010-10.org.openstack:volume-1 1"
    )


def test_provider_location_variants() -> None:
    info = parse_provider_location("[fd00::1]:3261;host.example " + IQN + " 0\n")
    assert [str(c.portal) for c in info.candidates] == ["[fd00::1]:3261", "host.example:3260"]
    assert all(c.portal.tpgt is None for c in info.candidates)
    assert parse_provider_location(f"10.0.1.2:3260,0 {IQN}", default_lun=4).main.lun == 4
    # Cinder's _iscsi_location formats a missing LUN as "None".
    assert parse_provider_location(f"10.0.1.2:3260,0 {IQN} None", default_lun=1).main.lun == 1
    deduped = parse_provider_location(f"10.0.1.2:3260;10.0.1.2 {IQN} 2")
    assert len(deduped.candidates) == 1
    assert deduped.addressing_mode is AddressingMode.SAM
    sam2 = parse_provider_location(f"10.0.1.2:3260 {IQN} 256", addressing_mode="SAM2")
    assert sam2.addressing_mode is AddressingMode.SAM2
    assert format_provider_location(sam2) == f"10.0.1.2:3260 {IQN} 256"
    with pytest.raises(ConnectionInfoError) as caught:
        parse_provider_location(f"10.0.1.2:3260 {IQN} 256", addressing_mode="sam2")
    assert caught.value.key == "addressing_mode"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("", "provider_location"),
        ("10.0.1.2:3260", "provider_location"),
        (f"10.0.1.2:3260 {IQN} 1 extra", "provider_location"),
        (f"10.0.1.2:3260,1;10.0.2.2:3260,1 {IQN} 1", "provider_location"),
        (f"10.0.1.2:3260,1;10.0.2.2:3260 {IQN} 1", "provider_location.tpgt"),
        (f"10.0.1.2:3260,1,1 {IQN} 1", "provider_location"),
        (f"10.0.1.2:3260,x {IQN} 1", "provider_location.tpgt"),
        (f"10.0.1.2:3260,65536 {IQN} 1", "provider_location.tpgt"),
        (f"10.0.1.2:3260;;10.0.2.2 {IQN} 1", "provider_location.portals[1]"),
        (f"10.0.1.2:3260;10.0.2.2:0 {IQN} 1", "provider_location.portals[1]"),
        ("10.0.1.2:3260 iqn.nope 1", "provider_location.iqn"),
        (f"10.0.1.2:3260 {IQN} -1", "provider_location.lun"),
        (f"10.0.1.2:3260 {IQN} 16384", "provider_location.lun"),
        (f"10.0.1.2:3260 {IQN}", "provider_location.lun"),
        (f"10.0.1.2:3260 {IQN} None", "provider_location.lun"),
        (f"10.0.1.2:3260 {IQN} none", "provider_location.lun"),
    ],
)
def test_provider_location_errors(text: str, key: str) -> None:
    with pytest.raises(ConnectionInfoError) as caught:
        parse_provider_location(text)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_provider_location_not_a_str() -> None:
    with pytest.raises(ConnectionInfoError) as caught:
        parse_provider_location(b"10.0.1.2 iqn.2010-10.org.x:y 1")  # type: ignore[arg-type]
    assert caught.value.key == "provider_location"


def test_format_provider_location_refuses_what_it_cannot_express() -> None:
    portal_a = Portal(host="10.0.1.2")
    portal_b = Portal(host="10.0.2.2")
    first = Candidate(index=0, portal=portal_a, iqn=IQN, lun=1)
    cases = [
        ([first, Candidate(index=1, portal=portal_b, iqn=IQN2, lun=1)], "candidates[1].iqn"),
        ([first, Candidate(index=1, portal=portal_b, iqn=IQN, lun=2)], "candidates[1].lun"),
        (
            [first, Candidate(index=1, portal=Portal(host="10.0.2.2", tpgt=2), iqn=IQN, lun=1)],
            "candidates[1].portal",
        ),
        ([], "candidates"),
        ([first, "x"], "candidates[1]"),
    ]
    for candidates, key in cases:
        with pytest.raises(ConnectionInfoError) as caught:
            format_provider_location(candidates)  # type: ignore[arg-type]
        assert caught.value.key == key
    with pytest.raises(ConnectionInfoError):
        format_provider_location("10.0.1.2 " + IQN)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# build_connection_info


def test_build_golden() -> None:
    built = build_connection_info(
        ["10.0.1.2:3260", Portal(host="FD00::2", port=3261, tpgt=3)],
        [IQN, IQN2.upper()],
        [1, 2],
        auth=creds("alice", "S3cr3t-Good-Pa55"),
        target_auth=creds("array", "Mutu4l-Good-Pa55"),
        discovery_auth=creds("disco", "D1sc0very-Good-Pa55"),
        extra={"volume_id": "v1", "access_mode": "rw"},
    )
    assert built == {
        "driver_volume_type": "iscsi",
        "data": {
            "target_portal": "10.0.1.2:3260",
            "target_iqn": IQN,
            "target_lun": 1,
            "target_alternative_portals": ["[fd00::2]:3261,3"],
            "target_alternative_iqns": [IQN2],
            "target_alternative_luns": [2],
            "auth_method": "CHAP",
            "auth_username": "alice",
            "auth_password": "S3cr3t-Good-Pa55",
            "auth_username_in": "array",
            "auth_password_in": "Mutu4l-Good-Pa55",
            "discovery_auth_method": "CHAP",
            "discovery_auth_username": "disco",
            "discovery_auth_password": "D1sc0very-Good-Pa55",
            "volume_id": "v1",
            "access_mode": "rw",
        },
    }
    assert "addressing_mode" not in built["data"]  # type: ignore[operator]
    assert json.loads(json.dumps(built)) == built
    shown = json.dumps(redacted(built))
    assert_no_planted_secret(shown)
    assert shown.count(MASK) == 3


def test_build_single_portal_and_multipath() -> None:
    single = build_connection_info("10.0.1.2", IQN, 0)
    assert single == {
        "driver_volume_type": "iscsi",
        "data": {"target_portal": "10.0.1.2:3260", "target_iqn": IQN, "target_lun": 0},
    }
    multi = build_connection_info(["10.0.1.2", "10.0.2.2"], IQN, 5, multipath=True)
    data = multi["data"]
    assert isinstance(data, dict)
    assert data["target_portals"] == ["10.0.1.2:3260", "10.0.2.2:3260"]
    assert data["target_iqns"] == [IQN, IQN]
    assert data["target_luns"] == [5, 5]
    assert data["target_alternative_portals"] == ["10.0.2.2:3260"]
    info = parse_connection_info(multi)
    assert [str(c.portal) for c in info.candidates] == ["10.0.1.2:3260", "10.0.2.2:3260"]
    only_multi = parse_connection_info(build_connection_info(["10.0.1.2"], IQN, 5, multipath=True))
    assert only_multi.source == "multipath"
    assert len(only_multi.candidates) == 1


def test_build_writes_the_addressing_mode_as_os_brick_spells_it() -> None:
    built = build_connection_info(
        ["10.0.1.2", "10.0.2.2"], IQN, 256, addressing_mode=AddressingMode.SAM3_FLAT
    )
    assert built["data"] == {  # the only addition is the key
        "target_portal": "10.0.1.2:3260",
        "target_iqn": IQN,
        "target_lun": 256,
        "target_alternative_portals": ["10.0.2.2:3260"],
        "target_alternative_iqns": [IQN],
        "target_alternative_luns": [256],
        "addressing_mode": "SAM3-flat",
    }
    assert json.dumps(built).count('"SAM3-flat"') == 1  # the value, not the enum's repr
    assert parse_connection_info(built).addressing_mode is AddressingMode.SAM3_FLAT
    sam = build_connection_info("10.0.1.2", IQN, 0, addressing_mode="SAM")
    assert sam["data"]["addressing_mode"] == "SAM"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"portals": []}, "portals"),
        ({"portals": ["10.0.1.2", "10.0.1.2:3260"]}, "portals[1]"),
        ({"portals": ["10.0.1.2", "10.0.2.2:99999"]}, "portals[1]"),
        ({"portals": 5}, "portals"),
        ({"iqns": [IQN, IQN]}, "iqns"),
        ({"iqns": ["nope"]}, "iqns[0]"),
        ({"iqns": "nope"}, "iqns"),
        ({"iqns": 7}, "iqns"),
        ({"luns": [1, 2]}, "luns"),
        ({"luns": -1}, "luns"),
        ({"luns": True}, "luns"),
        ({"luns": ["1"]}, "luns[0]"),
        ({"luns": 1.0}, "luns"),
        ({"auth": "alice:pw"}, "auth"),
        ({"auth": creds("alice", "")}, "auth.secret"),
        ({"auth": creds("", "S3cr3t-Good-Pa55")}, "auth.username"),
        ({"auth": creds("alice", b"\xff\xfe-not-utf8")}, "auth.secret"),
        ({"target_auth": creds("array", "Mutu4l-Good-Pa55")}, "target_auth"),
        (
            {
                "auth": creds("alice", "S3cr3t-Good-Pa55"),
                "target_auth": creds("array", "S3cr3t-Good-Pa55"),
            },
            "target_auth",
        ),
        (
            {"discovery_target_auth": creds("a", "Mutu4l-Good-Pa55")},
            "discovery_target_auth",
        ),
        ({"extra": {"target_portal": "10.9.9.9"}}, "target_portal"),
        ({"extra": {"auth_password": "x"}}, "auth_password"),
        ({"extra": {"target_auth_password": "x"}}, "target_auth_password"),
        ({"extra": {1: "x"}}, "extra"),
        ({"extra": {"addressing_mode": "SAM2"}}, "addressing_mode"),
        ({"addressing_mode": "sam2"}, "addressing_mode"),
        ({"addressing_mode": 2}, "addressing_mode"),
        ({"extra": [("volume_id", "v")]}, "extra"),
    ],
)
def test_build_errors(kwargs: dict[str, Any], key: str) -> None:
    arguments: dict[str, Any] = {"portals": ["10.0.1.2"], "iqns": IQN, "luns": 1}
    arguments.update(kwargs)
    with pytest.raises(ConnectionInfoError) as caught:
        build_connection_info(**arguments)
    assert caught.value.key == key
    assert key in str(caught.value)
    assert_no_planted_secret(str(caught.value), repr(caught.value))


# --------------------------------------------------------------------------------------------
# Model invariants


def test_candidate_validates_and_normalises() -> None:
    candidate = Candidate(index=0, portal=Portal(host="10.0.1.2"), iqn=IQN.upper(), lun=3)
    assert candidate.iqn == IQN
    bad: list[tuple[dict[str, Any], str]] = [
        ({"index": -1}, "index"),
        ({"index": True}, "index"),
        ({"portal": "10.0.1.2"}, "portal"),
        ({"iqn": "iqn.x"}, "iqn"),
        ({"iqn": 5}, "iqn"),
        ({"lun": "1"}, "lun"),
        ({"lun": MAX_LUN + 1}, "lun"),
    ]
    for change, key in bad:
        fields: dict[str, Any] = {"index": 0, "portal": Portal(host="10.0.1.2"), "iqn": IQN}
        fields["lun"] = 0
        fields.update(change)
        with pytest.raises(ConnectionInfoError) as caught:
            Candidate(**fields)
        assert caught.value.key == key


def test_connection_info_invariants() -> None:
    a = Candidate(index=0, portal=Portal(host="10.0.1.2"), iqn=IQN, lun=0)
    b = Candidate(index=1, portal=Portal(host="10.0.2.2"), iqn=IQN, lun=0)
    info = ConnectionInfo(candidates=[a, b], source="alternatives")  # type: ignore[arg-type]
    assert info.candidates == (a, b)
    ours = creds("alice", "S3cr3t-Good-Pa55")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"candidates": ()}, "candidates"),
        ({"candidates": None}, "candidates"),
        ({"candidates": (b, a)}, "candidates[0]"),
        (
            {"candidates": (a, Candidate(index=1, portal=Portal(host="10.0.1.2"), iqn=IQN, lun=0))},
            "candidates[1]",
        ),
        ({"candidates": (a, "b")}, "candidates[1]"),
        ({"source": "other"}, "source"),
        ({"chap": "alice"}, "chap"),
        ({"target_chap": creds("array", "Mutu4l-Good-Pa55")}, "target_chap"),
        (
            {"chap": ours, "target_chap": creds("array", "S3cr3t-Good-Pa55")},
            "target_chap",
        ),
        ({"discovery_target_chap": ours}, "discovery_target_chap"),
    ]
    for change, key in bad:
        fields: dict[str, Any] = {"candidates": (a, b), "source": "single"}
        fields.update(change)
        with pytest.raises(ConnectionInfoError) as caught:
            ConnectionInfo(**fields)
        assert caught.value.key == key
        assert_no_planted_secret(str(caught.value))


# --------------------------------------------------------------------------------------------
# redacted


def test_redacted_masks_deeply_and_copies() -> None:
    original: dict[str, Any] = {
        "driver_volume_type": "iscsi",
        "data": {
            "auth_password": "S3cr3t-Good-Pa55",
            "Discovery_Auth_PASSWORD": "D1sc0very-Good-Pa55",
            "target_auth_password": None,
            "nested": [{"client_secret": {"x": 1}}, ("api_token", {"token": 5})],
            "provider_auth": "CHAP alice S3cr3t-Good-Pa55",
            "wrapped": Secret("Mutu4l-Good-Pa55"),
            "auth_username": "alice",
            "portals": ["10.0.1.2:3260"],
        },
    }
    result = redacted(original)
    assert isinstance(result, dict)
    data = result["data"]
    assert data["auth_password"] == MASK
    assert data["Discovery_Auth_PASSWORD"] == MASK
    assert data["target_auth_password"] is None
    assert data["nested"] == [{"client_secret": MASK}, ("api_token", {"token": MASK})]
    assert data["provider_auth"] == MASK
    assert data["wrapped"] == MASK
    assert data["auth_username"] == "alice"
    assert data["portals"] == ["10.0.1.2:3260"]
    assert data["portals"] is not original["data"]["portals"]
    assert original["data"]["auth_password"] == "S3cr3t-Good-Pa55"  # input untouched
    assert_no_planted_secret(repr(result))


def test_redacted_survives_cycles_and_scalars() -> None:
    loop: list[object] = ["a"]
    loop.append(loop)
    assert redacted(loop) == ["a", "<cycle>"]
    assert redacted("text") == "text"
    assert redacted(None) is None


# --------------------------------------------------------------------------------------------
# Hypothesis: round trips


hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9](\.[a-z][a-z0-9]{0,5}){0,2}", fullmatch=True)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    hostnames,
)
portals = st.builds(
    Portal,
    host=hosts,
    port=st.integers(1, 65535),
    tpgt=st.none() | st.integers(0, 65535),
)
iqns = st.one_of(
    st.from_regex(
        r"iqn\.(19|20)[0-9]{2}-(0[1-9]|1[0-2])\.(com|org|net)\.[a-z][a-z0-9]{0,8}"
        r"(:[a-zA-Z0-9.:-]{1,24})?",
        fullmatch=True,
    ),
    st.from_regex(r"eui\.[0-9a-fA-F]{16}", fullmatch=True),
    st.from_regex(r"naa\.([0-9a-f]{16}|[0-9a-f]{32})", fullmatch=True),
)
luns = st.integers(0, MAX_LUN)
entries = st.lists(
    st.tuples(portals, iqns, luns, st.booleans()),
    min_size=1,
    max_size=6,
    unique_by=lambda e: (e[0].host, e[0].port, validate_iscsi_name(e[1]), e[2]),
)
secrets_text = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_categories=["Cs"]),
    min_size=1,
    max_size=20,
)
chaps = st.none() | st.builds(creds, secrets_text, secrets_text)
modes = st.none() | st.sampled_from(AddressingMode)


@settings(max_examples=150, deadline=None)
@given(
    entries=entries,
    multipath=st.booleans(),
    auth=chaps,
    discovery=chaps,
    as_text=st.booleans(),
    mode=modes,
)
def test_build_then_parse_round_trips(
    entries: list[tuple[Portal, str, int, bool]],
    multipath: bool,
    auth: ChapCredentials | None,
    discovery: ChapCredentials | None,
    as_text: bool,
    mode: AddressingMode | None,
) -> None:
    given_portals = [p if as_object else p.with_tpgt() for p, _, _, as_object in entries]
    built = build_connection_info(
        given_portals,
        [iqn for _, iqn, _, _ in entries],
        [lun for _, _, lun, _ in entries],
        auth=auth,
        discovery_auth=discovery,
        multipath=multipath,
        addressing_mode=mode,
    )
    document: object = json.dumps(built) if as_text else built
    info = parse_connection_info(document)  # type: ignore[arg-type]
    assert info.candidates == tuple(
        Candidate(index=i, portal=p, iqn=validate_iscsi_name(iqn), lun=lun)
        for i, (p, iqn, lun, _) in enumerate(entries)
    )
    assert info.chap == auth
    assert info.discovery_chap == discovery
    assert info.target_chap is None
    assert info.addressing_mode is (AddressingMode.SAM if mode is None else mode)
    expected_source = (
        "alternatives" if len(entries) > 1 else ("multipath" if multipath else "single")
    )
    assert info.source == expected_source


# Marked so that a secret can never be a mere substring of an address, name or number.
marked_secrets = secrets_text.map(lambda text: f"\u00a7{text}\u00a7")


@settings(max_examples=100, deadline=None)
@given(
    ours=marked_secrets,
    theirs=marked_secrets,
    user=st.from_regex(r"[a-z]{1,12}", fullmatch=True),
)
def test_mutual_chap_round_trips(ours: str, theirs: str, user: str) -> None:
    assume(ours != theirs)
    built = build_connection_info(
        ["10.0.1.2"],
        IQN,
        0,
        auth=creds(user, ours),
        target_auth=creds(user + "-t", theirs),
        discovery_auth=creds(user, theirs),
        discovery_target_auth=creds(user + "-d", ours),
    )
    info = parse_connection_info(json.dumps(built).encode())
    assert info.chap == creds(user, ours)
    assert info.target_chap == creds(user + "-t", theirs)
    assert info.discovery_chap == creds(user, theirs)
    assert info.discovery_target_chap == creds(user + "-d", ours)
    shown = json.dumps(redacted(built), ensure_ascii=False)
    for secret in (ours, theirs):
        assert secret not in repr(info)
        assert secret not in shown


@settings(max_examples=150, deadline=None)
@given(
    portal_list=st.lists(
        st.builds(Portal, host=hosts, port=st.integers(1, 65535)),
        min_size=1,
        max_size=5,
        unique_by=lambda p: (p.host, p.port),
    ),
    tpgt=st.none() | st.integers(0, 65535),
    iqn=iqns,
    lun=luns,
    mode=st.sampled_from(AddressingMode),
)
def test_provider_location_round_trips(
    portal_list: list[Portal], tpgt: int | None, iqn: str, lun: int, mode: AddressingMode
) -> None:
    candidates = tuple(
        Candidate(index=i, portal=Portal(host=p.host, port=p.port, tpgt=tpgt), iqn=iqn, lun=lun)
        for i, p in enumerate(portal_list)
    )
    text = format_provider_location(candidates)
    info = parse_provider_location(text, addressing_mode=mode)
    assert info.candidates == candidates
    assert info.addressing_mode is mode
    assert format_provider_location(info) == text
    assert parse_provider_location(format_provider_location(info), addressing_mode=mode) == info


# --------------------------------------------------------------------------------------------
# Hypothesis: totality (only ConnectionInfoError, never a builtin exception)

KNOWN_KEYS = sorted(
    {
        "driver_volume_type",
        "data",
        "target_portal",
        "target_iqn",
        "target_lun",
        "target_alternative_portals",
        "target_alternative_iqns",
        "target_alternative_luns",
        "target_portals",
        "target_iqns",
        "target_luns",
        "auth_method",
        "auth_username",
        "auth_password",
        "auth_username_in",
        "auth_password_in",
        "target_auth_username",
        "target_auth_password",
        "discovery_auth_method",
        "discovery_auth_username",
        "discovery_auth_password",
        "discovery_auth_username_in",
        "discovery_auth_password_in",
        "discovery_target_auth_username",
        "discovery_target_auth_password",
        "provider_location",
        "addressing_mode",
    }
)
plausible_scalars = st.one_of(
    st.sampled_from(
        [
            *("10.0.1.2:3260", "[fd00::1]:3260", "10.0.2.2", IQN, "CHAP", "None", "iscsi", "1"),
            *("", "SAM", "SAM2", "SAM3-flat", "transparent", "sam2"),
        ]
    ),
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.text(st.characters(categories=["Cs", "Ll", "Nd"]), max_size=8),  # lone surrogates too
)
json_like = st.recursive(
    plausible_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=25,
)
data_like = st.dictionaries(st.sampled_from(KNOWN_KEYS), json_like, max_size=10)


def parse_only_our_error(document: object) -> ConnectionInfo | None:
    try:
        return parse_connection_info(document)  # type: ignore[arg-type]
    except ConnectionInfoError as exc:
        caught = exc
    assert isinstance(caught.key, str)
    assert caught.key in str(caught)
    return None


@settings(max_examples=400, deadline=None)
@given(document=json_like | data_like | st.builds(lambda d: {"data": d}, data_like))
def test_fuzz_mappings_raise_only_connection_info_error(document: object) -> None:
    parse_only_our_error(document)
    try:
        text = json.dumps(document)
    except (ValueError, TypeError):
        return
    parse_only_our_error(text)
    parse_only_our_error(text.encode())


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_raw_text_raises_only_connection_info_error(raw: bytes | str) -> None:
    parse_only_our_error(raw)


GOOD_CHAP = json.loads((GOOD_DIR / "chap_mutual_and_discovery.json").read_text())


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(sorted(GOOD_CHAP["data"])) | st.sampled_from(KNOWN_KEYS),
    value=json_like,
    delete=st.booleans(),
)
def test_fuzz_mutated_good_input_never_leaks_a_password(
    key: str, value: object, delete: bool
) -> None:
    document = json.loads(json.dumps(GOOD_CHAP))
    if delete:
        document["data"].pop(key, None)
    else:
        document["data"][key] = value
    try:
        info = parse_connection_info(document)
    except ConnectionInfoError as exc:
        assert_no_planted_secret(str(exc), repr(exc))
    else:
        assert_no_planted_secret(repr(info))
    assert_no_planted_secret(json.dumps(redacted(document), default=repr))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=120) | st.from_regex(r"[0-9a-z.:;,\[\] -]{0,60}", fullmatch=True))
def test_fuzz_provider_location_raises_only_connection_info_error(text: str) -> None:
    try:
        info = parse_provider_location(text)
    except ConnectionInfoError as exc:
        caught = exc
    else:
        assert info.candidates
        return
    assert caught.key is not None
    assert caught.key in str(caught)


# --------------------------------------------------------------------------------------------
# Module hygiene


def test_pure_module_imports_no_io() -> None:
    code = (
        "import sys, pyiscsi_failover.connection_info\n"
        "print(sorted({'trio', 'socket', 'subprocess'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- read_limited

A_SECRET = "Planted-Secret-7781"


def test_read_limited_reads_a_whole_small_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(A_SECRET.encode() + b"\n")
    assert read_limited(path, what="CHAP secret file") == A_SECRET.encode() + b"\n"
    assert read_limited(str(path), what="CHAP secret file") == A_SECRET.encode() + b"\n"


def test_read_limited_accepts_exactly_the_limit_and_refuses_one_more(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * MAX_INPUT_BYTES)
    assert len(read_limited(path, what="connection_info")) == MAX_INPUT_BYTES == 1 << 20
    path.write_bytes(b" " * (MAX_INPUT_BYTES + 1))
    with pytest.raises(ConnectionInfoError) as info:
        read_limited(path, what="connection_info")
    assert str(info.value) == f"connection_info {str(path)!r} is larger than 1 MiB"
    with pytest.raises(ConnectionInfoError, match=r"is larger than 10 bytes"):
        read_limited(path, what="connection_info", limit=10)


def test_read_limited_stops_reading_an_endless_file() -> None:
    with pytest.raises(ConnectionInfoError) as info:
        read_limited("/dev/zero", what="CHAP secret file")
    assert str(info.value) == "CHAP secret file '/dev/zero' is larger than 1 MiB"


def test_read_limited_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ConnectionInfoError) as info:
        read_limited(path, what="CHAP secret file")
    assert str(info.value) == f"CHAP secret file {str(path)!r} is an empty file"


@pytest.mark.parametrize(
    ("name", "reason"), [("missing", "No such file or directory"), (".", "Is a directory")]
)
def test_read_limited_names_a_file_it_cannot_read(tmp_path: Path, name: str, reason: str) -> None:
    path = tmp_path / name
    with pytest.raises(ConnectionInfoError) as info:
        read_limited(path, what="connection_info")
    assert str(info.value) == f"cannot read connection_info {str(path)!r}: {reason}"
    assert isinstance(info.value, ISCSIError)


def test_read_limited_reads_binary_and_text_streams() -> None:
    assert read_limited(io.BytesIO(b"{}"), what="connection_info") == b"{}"
    text = io.StringIO('{"k": "\u00e9"}')
    assert read_limited(text, what="connection_info") == '{"k": "\u00e9"}'.encode()
    # A text stream's limit counts bytes too: 6 characters, 12 bytes.
    with pytest.raises(ConnectionInfoError, match="stream is larger than 10 bytes"):
        read_limited(io.StringIO("\u00e9" * 6), what="connection_info", limit=10)
    with pytest.raises(ConnectionInfoError, match="connection_info stream is empty"):
        read_limited(io.StringIO(""), what="connection_info")


def test_read_limited_names_stdin_and_keeps_a_bad_byte_out_of_the_error() -> None:
    class Stdin(io.TextIOWrapper):
        name = "<stdin>"

    stream = Stdin(io.BytesIO(A_SECRET.encode() + b"\xff"), encoding="utf-8")
    with pytest.raises(ConnectionInfoError) as info:
        read_limited(stream, what="connection_info")
    assert str(info.value) == "connection_info <stdin> is not UTF-8 text (bad byte at offset 19)"
    assert info.value.__context__ is None and info.value.__cause__ is None
    with pytest.raises(ConnectionInfoError) as lone:
        read_limited(io.StringIO(A_SECRET + "\ud800"), what="CHAP secret file")
    assert "lone surrogate" in str(lone.value)
    assert lone.value.__context__ is None
    assert A_SECRET not in str(lone.value) + repr(lone.value)


def test_read_limited_reads_a_pipe_by_path(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(b'{"target_portal": "10.0.0.1"}')

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert read_limited(fifo, what="connection_info") == b'{"target_portal": "10.0.0.1"}'
    finally:
        writer.join(timeout=30)


def test_parse_connection_info_refuses_json_text_over_the_limit() -> None:
    text = json.dumps(simple()) + " " * MAX_INPUT_BYTES
    for raw in (text, text.encode()):
        with pytest.raises(ConnectionInfoError) as info:
            parse_connection_info(raw)
        assert info.value.key == "connection_info"
        assert "larger than 1 MiB" in str(info.value)
    # The limit itself is fine.
    exact = json.dumps(simple())
    exact += " " * (MAX_INPUT_BYTES - len(exact))
    assert parse_connection_info(exact).main.iqn == IQN


# ---------------------------------------------------------------------------- secret length


@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("auth_password", {}),
        ("auth_password_in", {"auth_username_in": "tgt"}),
        ("target_auth_password", {"target_auth_username": "tgt"}),
        (
            "discovery_auth_password",
            {"discovery_auth_method": "CHAP", "discovery_auth_username": "d"},
        ),
    ],
)
def test_a_chap_secret_over_255_bytes_is_refused_naming_its_key(
    key: str, extra: dict[str, object]
) -> None:
    def info_with(secret: str) -> dict[str, object]:
        chap: dict[str, object] = {
            "auth_method": "CHAP",
            "auth_username": "alice",
            "auth_password": "Our-Own-Secret-0001",
            **extra,
        }
        if key.startswith("discovery"):
            chap["discovery_auth_password"] = secret
        else:
            chap[key] = secret
        return simple(**chap)

    fits = "K" * 253 + "\u00e9"  # 255 bytes
    parse_connection_info(info_with(fits))
    too_long = "K" * 255 + "\u00e9"  # 257 bytes, 256 characters
    with pytest.raises(ConnectionInfoError) as info:
        parse_connection_info(info_with(too_long))
    assert info.value.key == key
    assert str(info.value) == (
        f"{key}: is 257 bytes long; open-iscsi holds CHAP secrets of at most 255 bytes"
    )
    assert "KKKK" not in repr(info.value)
