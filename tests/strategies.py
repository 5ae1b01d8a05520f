"""Hypothesis strategies for every PDU model in :mod:`pyiscsi_failover.protocol.pdu`.

Each strategy yields PDUs the codec accepts (fields in range, ``T`` and ``C`` never both set,
an R2T's TTT never the reserved tag, a Referenced Task Tag exactly where the function names a
task), so ``decode_pdu(encode_pdu(x)) == x`` must hold for all of them. ``data`` lets a test
swap in its own data segments (e.g. real key=value text); the default is short arbitrary bytes,
which keeps the padding cases (length % 4) well covered. Import as ``from strategies import pdus``.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from pyiscsi_failover.protocol.pdu import (
    ISID,
    LUN_LENGTH,
    PDU,
    R2T,
    RESERVED_TAG,
    LoginRequest,
    LoginResponse,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Reject,
    RejectReason,
    ScsiDataOut,
    Stage,
    StatusClass,
    TaskFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TaskResponseCode,
    TextRequest,
    TextResponse,
)

__all__ = [
    "PDU_STRATEGIES",
    "data_outs",
    "data_segments",
    "isids",
    "login_requests",
    "login_responses",
    "logout_requests",
    "logout_responses",
    "nop_ins",
    "nop_outs",
    "pdus",
    "r2ts",
    "raw_luns",
    "rejects",
    "tags",
    "task_management_requests",
    "task_management_responses",
    "text_requests",
    "text_responses",
    "u8",
    "u16",
    "u32",
    "u64",
]

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

Data = st.SearchStrategy[bytes]


def tags() -> st.SearchStrategy[int]:
    """Task tags that name a task: any 32-bit value but the all-ones reserved one."""
    return st.integers(0, RESERVED_TAG - 1)


def raw_luns() -> st.SearchStrategy[bytes]:
    """LUN fields as the SCSI PDUs keep them: 8 raw bytes, any addressing method."""
    return st.binary(min_size=LUN_LENGTH, max_size=LUN_LENGTH)


def data_segments(max_size: int = 96) -> Data:
    """Arbitrary data segment contents of at most ``max_size`` bytes."""
    return st.binary(max_size=max_size)


def isids() -> st.SearchStrategy[ISID]:
    """Any ISID the 6-byte field can hold (type 3 included: the codec lets it through)."""
    return st.builds(ISID, t=st.integers(0, 3), a=st.integers(0, 63), b=u16, c=u8, d=u16)


def stages() -> st.SearchStrategy[Stage]:
    return st.sampled_from(Stage)


def _transit_cont() -> st.SearchStrategy[tuple[bool, bool]]:
    """(T, C) pairs a Login PDU may carry: never both."""
    return st.sampled_from([(False, False), (True, False), (False, True)])


@st.composite
def login_requests(draw: st.DrawFn, *, data: Data | None = None) -> LoginRequest:
    transit, cont = draw(_transit_cont())
    return LoginRequest(
        transit=transit,
        cont=cont,
        csg=draw(stages()),
        nsg=draw(stages()),
        isid=draw(isids()),
        itt=draw(u32),
        cmdsn=draw(u32),
        expstatsn=draw(u32),
        tsih=draw(u16),
        cid=draw(u16),
        version_max=draw(u8),
        version_min=draw(u8),
        data=draw(data if data is not None else data_segments()),
    )


@st.composite
def login_responses(draw: st.DrawFn, *, data: Data | None = None) -> LoginResponse:
    transit, cont = draw(_transit_cont())
    return LoginResponse(
        transit=transit,
        cont=cont,
        csg=draw(stages()),
        nsg=draw(stages()),
        isid=draw(isids()),
        itt=draw(u32),
        statsn=draw(u32),
        expcmdsn=draw(u32),
        maxcmdsn=draw(u32),
        status_class=draw(st.sampled_from(StatusClass)),
        status_detail=draw(u8),
        tsih=draw(u16),
        version_max=draw(u8),
        version_active=draw(u8),
        data=draw(data if data is not None else data_segments()),
    )


def text_requests(*, data: Data | None = None) -> st.SearchStrategy[TextRequest]:
    return st.builds(
        TextRequest,
        final=st.booleans(),
        cont=st.booleans(),
        itt=u32,
        cmdsn=u32,
        expstatsn=u32,
        ttt=u32,
        lun=u64,
        immediate=st.booleans(),
        data=data if data is not None else data_segments(),
    )


def text_responses(*, data: Data | None = None) -> st.SearchStrategy[TextResponse]:
    return st.builds(
        TextResponse,
        final=st.booleans(),
        cont=st.booleans(),
        itt=u32,
        ttt=u32,
        statsn=u32,
        expcmdsn=u32,
        maxcmdsn=u32,
        lun=u64,
        data=data if data is not None else data_segments(),
    )


def logout_requests() -> st.SearchStrategy[LogoutRequest]:
    return st.builds(
        LogoutRequest,
        reason=st.sampled_from(LogoutReason),
        itt=u32,
        cmdsn=u32,
        expstatsn=u32,
        cid=u16,
        immediate=st.booleans(),
    )


def logout_responses() -> st.SearchStrategy[LogoutResponse]:
    return st.builds(
        LogoutResponse,
        response=st.sampled_from(LogoutResponseCode),
        itt=u32,
        statsn=u32,
        expcmdsn=u32,
        maxcmdsn=u32,
        time2wait=u16,
        time2retain=u16,
    )


def rejects(*, data: Data | None = None) -> st.SearchStrategy[Reject]:
    """Rejects; by default the data is 48 bytes, like the rejected header it should carry."""
    return st.builds(
        Reject,
        reason=st.sampled_from(RejectReason),
        statsn=u32,
        expcmdsn=u32,
        maxcmdsn=u32,
        datasn=u32,
        data=data if data is not None else st.binary(min_size=48, max_size=48),
    )


def nop_outs(*, data: Data | None = None) -> st.SearchStrategy[NopOut]:
    return st.builds(
        NopOut,
        itt=u32,
        ttt=u32,
        cmdsn=u32,
        expstatsn=u32,
        lun=u64,
        immediate=st.booleans(),
        data=data if data is not None else data_segments(),
    )


def nop_ins(*, data: Data | None = None) -> st.SearchStrategy[NopIn]:
    return st.builds(
        NopIn,
        itt=u32,
        ttt=u32,
        statsn=u32,
        expcmdsn=u32,
        maxcmdsn=u32,
        lun=u64,
        data=data if data is not None else data_segments(),
    )


def data_outs(*, data: Data | None = None) -> st.SearchStrategy[ScsiDataOut]:
    """Data-Outs, unsolicited (reserved TTT) or answering an R2T."""
    return st.builds(
        ScsiDataOut,
        itt=u32,
        expstatsn=u32,
        datasn=u32,
        buffer_offset=u32,
        final=st.booleans(),
        ttt=st.just(RESERVED_TAG) | u32,
        lun=raw_luns(),
        data=data if data is not None else data_segments(),
    )


def r2ts() -> st.SearchStrategy[R2T]:
    return st.builds(
        R2T,
        itt=u32,
        ttt=tags(),
        statsn=u32,
        expcmdsn=u32,
        maxcmdsn=u32,
        r2tsn=u32,
        desired_length=st.integers(1, 2**32 - 1),
        buffer_offset=u32,
        lun=raw_luns(),
    )


@st.composite
def task_management_requests(draw: st.DrawFn) -> TaskManagementRequest:
    function = draw(st.sampled_from(TaskFunction))
    return TaskManagementRequest(
        function=function,
        itt=draw(u32),
        cmdsn=draw(u32),
        expstatsn=draw(u32),
        referenced_task_tag=draw(tags()) if function.references_task else RESERVED_TAG,
        lun=draw(raw_luns()),
        refcmdsn=draw(u32),
        expdatasn=draw(u32),
        immediate=draw(st.booleans()),
    )


def task_management_responses() -> st.SearchStrategy[TaskManagementResponse]:
    return st.builds(
        TaskManagementResponse,
        response=st.sampled_from(TaskResponseCode),
        itt=u32,
        statsn=u32,
        expcmdsn=u32,
        maxcmdsn=u32,
    )


#: One zero-argument strategy factory per PDU type, for tests parametrised over all of them.
PDU_STRATEGIES: dict[type[PDU], Callable[[], st.SearchStrategy[PDU]]] = {
    LoginRequest: login_requests,
    LoginResponse: login_responses,
    TextRequest: text_requests,
    TextResponse: text_responses,
    LogoutRequest: logout_requests,
    LogoutResponse: logout_responses,
    Reject: rejects,
    NopOut: nop_outs,
    NopIn: nop_ins,
    ScsiDataOut: data_outs,
    R2T: r2ts,
    TaskManagementRequest: task_management_requests,
    TaskManagementResponse: task_management_responses,
}


def pdus() -> st.SearchStrategy[PDU]:
    """Any PDU of any type."""
    return st.one_of(
        login_requests(),
        login_responses(),
        text_requests(),
        text_responses(),
        logout_requests(),
        logout_responses(),
        rejects(),
        nop_outs(),
        nop_ins(),
        data_outs(),
        r2ts(),
        task_management_requests(),
        task_management_responses(),
    )
