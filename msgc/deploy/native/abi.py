"""The native library's interface as ctypes structures, declared here independently of ``csrc/msgc.h``.

Each struct is a list of ``(type, name)`` fields in the header's notation; :func:`describe` renders the
same text that the library's ``msgc_abi()`` returns, so that :func:`check` catches a field or an entry
point changed on one side only (a mismatch would otherwise pass wrong arguments silently).
"""
import ctypes
from typing import Dict, List, Tuple

__all__ = ["STRUCTS", "ENTRIES", "AbiMismatch", "describe", "check", "bind"]

_SCALARS = {"i32": ctypes.c_int32, "i64": ctypes.c_int64}
_POINTERS = ("cf", "wf", "ci", "wi", "cl", "wl", "cv")

#: name -> fields, in the header's order (nested structs by name, declared before their users)
FIELDS: List[Tuple[str, str]] = [
    ("msgc_geom", "i32 h; i32 w; i32 k; i32 s; i32 p"),
    ("msgc_heads", "i32 heads; i32 in_channels; i32 per_head; ci counts; ci cols; ci wrow; cf scale; ci ocounts; "
                   "ci ocols; i32 xstep"),
    ("msgc_weights", "cf blocked; cf plain; i64 rows; cf bias; i32 kernel; i32 tiles"),
    ("msgc_io", "cf x; i64 ldx; i32 xcols; wf y; i64 ldy; cf res; i64 ldres; i32 act"),
    ("msgc_conv_args", "msgc_geom g; msgc_heads hd; msgc_weights wt; msgc_io io; i32 bn; i32 nthreads; wl executed"),
    ("msgc_dw_args", "msgc_geom g; i32 c; cf x; i64 ldx; cf weight; cf bias; wf y; i64 ldy; i32 act; i32 nthreads"),
    ("msgc_gen_args", "cf x; i64 ldx; i32 hw; i32 c; cf w1; cf b1; i32 nh; i32 ngen; cl desc; i32 desc_fields; "
                      "cf w2; cf b2; wf out; i32 nthreads"),
    ("msgc_sets_args", "cf logits; i32 heads; i32 channels; cf att; wi counts; wi idx; wf vals; wi uni; wi pos; "
                       "i32 groups; wi gcounts; wi gidx; i32 host_groups; wi hcounts; wi hidx; wi hrow; wi hpos; "
                       "wf hvals"),
    ("msgc_buf", "i32 h; i32 w; i32 cols; i32 parent; i32 col0; i64 offset"),
    ("msgc_set", "i32 heads; i32 channels; i32 groups; i32 host_groups; i64 ioff; i64 foff; i32 stats"),
    ("msgc_op", "i32 kind; i32 index"),
    ("msgc_conv_op", "i32 src; i32 dst; i32 res; i32 in_set; i32 att; i32 out_mode; i32 out_set; msgc_geom g; "
                     "i32 heads; i32 in_channels; i32 per_head; i32 host_groups; msgc_weights wt; i32 act; i32 bn; "
                     "i32 all_rule"),
    ("msgc_gates_op", "i32 src; i32 c; i32 nh; i32 ngen; cf w1; cf b1; cl desc; i32 desc_fields; cf w2; cf b2; "
                      "i64 out; i64 macs"),
    ("msgc_sets_op", "i32 set; i64 logits; cf ext; i64 att"),
    ("msgc_dw_op", "i32 src; i32 dst; i32 set; msgc_geom g; cf weight; cf bias; i32 act; i32 bn"),
    ("msgc_affine_op", "i32 src; i32 dst; cf scale; cf shift; i32 act; i32 macs"),
    ("msgc_pool_op", "i32 src; i32 dst; i32 kind; i32 k; i32 s; i32 p; i32 macs"),
    ("msgc_head_op", "i32 src; cf weight; cf bias; i32 classes"),
    ("msgc_fused_op", "i32 expand; i32 dw; i32 project; i32 rows"),
    ("msgc_program", "i32 n_ops; cv ops; cv convs; cv gates; cv sets_ops; cv dws; cv affines; cv pools; cv heads; "
                     "cv fused; i32 n_bufs; cv bufs; i32 n_sets; cv sets; i64 farena; i64 iarena; i32 nstats; "
                     "i32 nout; i32 input_nchw; i32 group; i32 group_from"),
    ("msgc_run_args", "cv program; i32 n; cf x; i64 x_stride; i64 x_ld; wf out; wi stats; wl executed; "
                      "i32 nthreads; i32 keep; i32 op; i32 reps; wl times"),
    ("msgc_info", "wi out"),
    ("msgc_peak_args", "i64 iters; i32 reps; wl times; wl macs; wf sink"),
]

#: entry point -> its argument struct
ENTRIES: List[Tuple[str, str]] = [
    ("msgc_conv", "msgc_conv_args"), ("msgc_dwconv", "msgc_dw_args"), ("msgc_generators", "msgc_gen_args"),
    ("msgc_head_sets", "msgc_sets_args"), ("msgc_run", "msgc_run_args"), ("msgc_describe", "msgc_info"),
    ("msgc_fma_peak", "msgc_peak_args"),
]


def _fields(spec: str) -> List[Tuple[str, str]]:
    return [tuple(f.split()) for f in spec.split(";")]


def _make_structs() -> Dict[str, type]:
    out: Dict[str, type] = {}
    for name, spec in FIELDS:
        fields = []
        for kind, field in _fields(spec):
            if kind in _SCALARS:
                ctype = _SCALARS[kind]
            elif kind in _POINTERS:
                ctype = ctypes.c_void_p
            else:
                ctype = out[kind]
            fields.append((field, ctype))
        out[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    return out


#: name -> ctypes.Structure subclass
STRUCTS = _make_structs()


def describe() -> str:
    """The interface as ``msgc_abi()`` writes it: every struct, then every entry point."""
    structs = "".join(f"{name}{{" + "".join(f"{k} {f};" for k, f in _fields(spec)) + "}" for name, spec in FIELDS)
    return structs + "".join(f"{name}({args});" for name, args in ENTRIES)


class AbiMismatch(RuntimeError):
    """The library's interface differs from the one this module declares."""


def check(lib: ctypes.CDLL) -> None:
    """Raise :class:`AbiMismatch` (naming the first difference) unless ``lib`` has exactly this interface."""
    try:
        lib.msgc_abi.restype = ctypes.c_char_p
        theirs = lib.msgc_abi().decode()
    except AttributeError as e:
        raise AbiMismatch(f"the library has no msgc_abi ({e})") from None
    ours = describe()
    if theirs != ours:
        i = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise AbiMismatch(f"the library's interface differs from msgc.deploy.native's at "
                          f"...{theirs[max(0, i - 40):i + 40]} (expected ...{ours[max(0, i - 40):i + 40]}); the C "
                          "sources and native/abi.py must change together")


def bind(lib: ctypes.CDLL) -> None:
    """Set every entry point's argument and return types (one pointer to its struct, an int32 status)."""
    for name, args in ENTRIES:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(STRUCTS[args])]
        fn.restype = ctypes.c_int32
    lib.msgc_isa.restype = ctypes.c_char_p
