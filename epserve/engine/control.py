"""ControlChannel: rank 0 sends every StepPlan to the other ranks over the CPU (gloo) group, counted.

    rank 0: send(plan) --[u32 next frame size | encode_plan(plan)]--HostCollectives.broadcast_bytes(frame)-->
        ranks > 0: recv() --decode_plan--> plan; every rank: frame = next frame size

The frame tracks the plans: each message names the frame size of the NEXT one (this message's size + 25%
headroom, in 64-byte steps, at least ``frame_bytes``), so a run of decode steps of similar size costs ONE
broadcast of about its own size each; a plan that outgrows its frame adds one broadcast of exactly the rest.
Every rank reads the next size from the same frame, so they always agree. Counted in the given CommCounters as
CollKind.CONTROL, phase "plan" (every step) and "plan_tail" (plans longer than their frame), layer None.
A peer that died makes the broadcast raise (gloo: connection closed, or the group's timeout); the caller
treats that as fatal. World size 1: send does nothing, recv is an error.

Plan encoding (little-endian; no pickle on the normal path):

    u8 format | u8 flags (shutdown, stats, has trace path, has replace) | i64 step | u32 works, releases,
    samplings, tokens | [u16 length + utf-8 trace path] | [i64 replace] | columns, each "u8 width code + values" of the narrowest signed integer
    that holds them: seq_id, start_pos, home_rank, tokens per work, sampling index, sample [works] |
    token ids [tokens] | release [releases] | temperature, top_p (f64) [samplings] | top_k, seed [samplings]

Equal SamplingParams are sent once (every greedy request shares one entry). A plan outside this format (an
integer beyond int64, a non-integer id) goes as a pickle instead (format byte 1): plans come from rank 0 of
the same job only.
"""

from __future__ import annotations

import pickle
import struct
import sys
from array import array
from dataclasses import fields

from comm.counters import CollKind, CommCounters
from comm.host_collectives import LEN_BYTES, HostCollectives
from comm.topology import EPTopology
from epserve.engine.plan import GREEDY, REPLACE_NONE, SamplingParams, SeqWork, StepPlan

FRAME_BYTES = 128              # the first and smallest frame (a heartbeat plan is 40 bytes with its header)
MAX_FRAME_BYTES = 1 << 16      # the largest frame a plan asks for the next one (longer plans add a tail)
_NEXT = struct.Struct("<I")
COMPACT, PICKLED = 0, 1
_HEAD = struct.Struct("<BBqIIII")
_SHUTDOWN, _STATS, _TRACE, _REPLACE = 1, 2, 4, 8
_I64 = struct.Struct("<q")
_WIDTHS = (("b", 2 ** 7), ("h", 2 ** 15), ("i", 2 ** 31), ("q", 2 ** 63))   # array typecodes: 1, 2, 4, 8 bytes
_BIG_ENDIAN = sys.byteorder == "big"
# The fields the compact format carries; a field added to a plan class must be added here (and to the codec).
_CARRIED = {StepPlan: {"step", "work", "release", "shutdown", "stats", "save_trace_to", "replace"},
            SeqWork: {"seq_id", "token_ids", "start_pos", "home_rank", "sampling", "sample"},
            SamplingParams: {"temperature", "top_p", "top_k", "seed"}}


class ControlChannel:
    def __init__(self, topology: EPTopology, *, counters: CommCounters | None = None,
                 frame_bytes: int = FRAME_BYTES) -> None:
        """``counters``: where the broadcasts are counted (the runner's, to see them beside the data
        collectives); a fresh CommCounters when None. ``frame_bytes``: the first and smallest frame; every
        rank must use the same."""
        if not LEN_BYTES + _NEXT.size < frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"frame_bytes must be in ({LEN_BYTES + _NEXT.size}, {MAX_FRAME_BYTES}], "
                             f"got {frame_bytes}")
        self.topology = topology
        self.min_frame_bytes = self.frame_bytes = frame_bytes    # frame_bytes: the next plan's frame
        self.host = HostCollectives(topology, counters if counters is not None else CommCounters())
        self.sent = 0       # plans sent (rank 0) or received (others)

    @property
    def counters(self) -> CommCounters:
        return self.host.counters

    def send(self, plan: StepPlan) -> None:
        if self.topology.rank != 0:
            raise RuntimeError(f"rank {self.topology.rank}: only rank 0 sends plans")
        self.sent += 1
        if not self.topology.is_distributed:
            return
        data = encode_plan(plan)
        following = next_frame_bytes(_NEXT.size + len(data), min_frame_bytes=self.min_frame_bytes)
        self.host.broadcast_bytes(_NEXT.pack(following) + data, phase="plan", kind=CollKind.CONTROL,
                                  frame_bytes=self.frame_bytes)
        self.frame_bytes = following

    def recv(self) -> StepPlan:
        if self.topology.rank == 0 or not self.topology.is_distributed:
            raise RuntimeError("recv is for ranks > 0 of a distributed group")
        message = self.host.broadcast_bytes(None, phase="plan", kind=CollKind.CONTROL, frame_bytes=self.frame_bytes)
        if len(message) < _NEXT.size:
            raise RuntimeError(f"control channel: a {len(message)}-byte message has no frame size")
        (following,) = _NEXT.unpack_from(message)
        if not self.min_frame_bytes <= following <= MAX_FRAME_BYTES:
            raise RuntimeError(f"control channel: next frame of {following} bytes is out of range")
        plan = decode_plan(message[_NEXT.size:])
        self.frame_bytes = following
        self.sent += 1
        return plan


def next_frame_bytes(message_bytes: int, *, min_frame_bytes: int = FRAME_BYTES) -> int:
    """The frame after a message of ``message_bytes``: its size with the length prefix + 25%, rounded up to
    64 bytes, within [min_frame_bytes, MAX_FRAME_BYTES]."""
    want = LEN_BYTES + message_bytes + message_bytes // 4
    return min(MAX_FRAME_BYTES, max(min_frame_bytes, -(-want // 64) * 64))


# ---- plan codec --------------------------------------------------------------------------------------------

def encode_plan(plan: StepPlan) -> bytes:
    """The plan's bytes: the compact format, or a pickle for a plan it cannot hold exactly."""
    try:
        return _encode_compact(plan)
    except (OverflowError, TypeError, ValueError, struct.error):
        return bytes([PICKLED]) + pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)


def decode_plan(data: bytes) -> StepPlan:
    if not data:
        raise RuntimeError("control channel: empty plan")
    if data[0] == PICKLED:
        plan = pickle.loads(data[1:])
        if not isinstance(plan, StepPlan):
            raise RuntimeError(f"control channel: expected a StepPlan, got {type(plan).__name__}")
        return plan
    if data[0] != COMPACT:
        raise RuntimeError(f"control channel: unknown plan format {data[0]}")
    try:
        return _decode_compact(memoryview(data))
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise RuntimeError(f"control channel: malformed plan ({len(data)} bytes): {exc}") from exc


def _encode_compact(plan: StepPlan) -> bytes:
    if type(plan) is not StepPlan or any(type(w) is not SeqWork or type(w.sampling) is not SamplingParams
                                         for w in plan.work):
        raise TypeError("not a plain StepPlan")
    work = plan.work
    samplings: dict[tuple, int] = {}
    sampling_idx = [samplings.setdefault(_sampling_key(w.sampling), len(samplings)) for w in work]
    tokens = [t for w in work for t in w.token_ids]
    flags = _SHUTDOWN * bool(plan.shutdown) | _STATS * bool(plan.stats) | _TRACE * (plan.save_trace_to is not None) \
        | _REPLACE * (plan.replace != REPLACE_NONE)
    parts = [_HEAD.pack(COMPACT, flags, plan.step, len(work), len(plan.release), len(samplings), len(tokens))]
    if plan.save_trace_to is not None:
        trace = plan.save_trace_to.encode("utf-8")
        parts.append(struct.pack("<H", len(trace)) + trace)
    if plan.replace != REPLACE_NONE:
        parts.append(_I64.pack(plan.replace))
    for column in ([w.seq_id for w in work], [w.start_pos for w in work], [w.home_rank for w in work],
                   [len(w.token_ids) for w in work], sampling_idx, [1 if w.sample else 0 for w in work], tokens,
                   plan.release):
        parts.append(_int_column(column))
    keys = list(samplings)
    parts += [_to_bytes(array("d", [k[0] for k in keys])), _to_bytes(array("d", [k[1] for k in keys])),
              _int_column([k[2] for k in keys]), _int_column([k[3] for k in keys])]
    return b"".join(parts)


def _decode_compact(buf: memoryview) -> StepPlan:
    _, flags, step, n_work, n_release, n_samp, n_tok = _HEAD.unpack_from(buf, 0)
    at = _HEAD.size
    trace = None
    if flags & _TRACE:
        (n,) = struct.unpack_from("<H", buf, at)
        trace, at = bytes(buf[at + 2:at + 2 + n]).decode("utf-8"), at + 2 + n
    replace = REPLACE_NONE
    if flags & _REPLACE:
        (replace,), at = _I64.unpack_from(buf, at), at + _I64.size
    cols = []
    for n in (n_work,) * 6 + (n_tok, n_release):
        col, at = _read_int_column(buf, at, n)
        cols.append(col)
    seq_id, start_pos, home_rank, n_tokens, samp_idx, sample, tokens, release = cols
    temp, at = _read(buf, at, "d", n_samp)
    top_p, at = _read(buf, at, "d", n_samp)
    top_k, at = _read_int_column(buf, at, n_samp)
    seed, at = _read_int_column(buf, at, n_samp)
    if at != len(buf) or sum(n_tokens) != n_tok or any(not 0 <= i < n_samp for i in samp_idx):
        raise ValueError("lengths do not add up")
    greedy = _sampling_key(GREEDY)
    samplings = [GREEDY if (t, p, k, s) == greedy else SamplingParams(temperature=t, top_p=p, top_k=k, seed=s)
                 for t, p, k, s in zip(temp, top_p, top_k, seed)]
    work, start = [], 0
    for i in range(n_work):
        end = start + n_tokens[i]
        work.append(SeqWork(seq_id[i], tuple(tokens[start:end]), start_pos[i], home_rank[i], samplings[samp_idx[i]],
                            sample[i] == 1))
        start = end
    return StepPlan(step=step, work=tuple(work), release=tuple(release), shutdown=bool(flags & _SHUTDOWN),
                    stats=bool(flags & _STATS), save_trace_to=trace, replace=replace)


def _sampling_key(s: SamplingParams) -> tuple:
    return (s.temperature, s.top_p, s.top_k, s.seed)


def _int_column(values) -> bytes:
    """u8 width code + the values as the narrowest little-endian signed integers that hold them all (a
    non-integer: TypeError; beyond int64: OverflowError)."""
    lo, hi = (min(values), max(values)) if values else (0, 0)
    for code, (typecode, bound) in enumerate(_WIDTHS):
        if -bound <= lo and hi < bound:
            return bytes([code]) + _to_bytes(array(typecode, values))
    raise OverflowError("integer beyond int64")


def _read_int_column(buf: memoryview, at: int, n: int) -> tuple[list[int], int]:
    code = buf[at]
    if code >= len(_WIDTHS):
        raise ValueError(f"unknown integer width code {code}")
    return _read(buf, at + 1, _WIDTHS[code][0], n)


def _read(buf: memoryview, at: int, typecode: str, n: int) -> tuple[list, int]:
    values = array(typecode)
    end = at + n * values.itemsize
    if end > len(buf):
        raise ValueError("truncated")
    values.frombytes(buf[at:end])
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist(), end


def _to_bytes(values: array) -> bytes:
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tobytes()


def _check_carried() -> None:
    if [array(t).itemsize for t, _ in _WIDTHS] != [1, 2, 4, 8] or array("d").itemsize != 8:
        raise RuntimeError("control.py's plan codec needs 1/2/4/8-byte array integers and 8-byte doubles")
    for cls, names in _CARRIED.items():
        have = {f.name for f in fields(cls)}
        if have != names:
            raise RuntimeError(f"control.py's plan codec carries {sorted(names)} of {cls.__name__}, which now has "
                              f"{sorted(have)}: teach the codec the new fields")


_check_carried()
