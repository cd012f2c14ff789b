"""Cross-device moments (jaxbn._src.combine) on 8 fake CPU devices against float64 NumPy.

Both methods (one all-gather; two O(F) all-reduces) must give the moments of the concatenated
data: uneven and empty devices, masks, axis_index_groups, nested names, vmap / pmap / shard_map,
large offsets. Also: the precision against one device, and the collectives in compiled HLO with
their payload bytes. ``tests/test_any_state.py`` checks whole layers at 1 to 32 devices.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn._src import combine, moments
from jaxbn._src.layout import make_layout
from tests import reference as ref

D = 8
METHODS = ("gather", "reduce")
# (offset, spread, per-device offset spread in units of spread)
CASES = {"1e4+N(0,1) per-device offsets": (1e4, 1.0, 1.0), "1e3+0.01N(0,1)": (1e3, 0.01, 0.0),
         "1e4+0.01N(0,1)": (1e4, 0.01, 0.0), "N(0,1)": (0.0, 1.0, 0.0)}


def _data(case, n=6, f=5, seed=0, devices=D):
    offset, spread, per_device = CASES[case]
    rng = np.random.default_rng(seed)
    x = offset + spread * (rng.normal(size=(devices, n, f))
                           + per_device * rng.normal(size=(devices, 1, f)))
    return x.astype(np.float32)


def _reference(x, mask=None):
    """float64 mean, biased variance and count over every device's valid rows, per feature."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w = np.ones_like(x) if mask is None else np.broadcast_to(
        np.asarray(mask).reshape(-1, np.asarray(mask).shape[-1]), x.shape).astype(np.float64)
    n = w.sum(0)
    x = np.where(w > 0, x, 0)  # padding may hold NaN
    mean = (w * x).sum(0) / np.maximum(n, 1)
    var = (w * (x - mean) ** 2).sum(0) / np.maximum(n, 1)
    return mean, var, n


def _stats(x, mask, axis_name, groups=None, method="auto"):
    """Per-device: local moments, combined; the mean's two floats and M2 / count."""
    m = moments.local_moments(x, mask, make_layout(x.shape, -1))
    g = combine.combine_across(m, axis_name, groups, method)
    count = jnp.broadcast_to(jnp.asarray(g.count, g.m0.dtype), g.m0.shape)
    return g.m0, g.corr, moments.safe_div(g.m2, g.count), count


def _bounds(x, mask=None):
    """Error bounds of the pooled mean (two floats) and variance: one device's two-pass bounds
    over all N values (tests.reference.moments_bound), doubled for the pooling (Chan's rule or
    the reduce's second round redo each sum once more), plus the pooling's own roundings of
    the D per-device terms: (D + 4) u times the variance."""
    f = x.shape[-1]
    flat = np.asarray(x, np.float64).reshape(-1, f)
    w = None if mask is None else np.broadcast_to(np.asarray(mask), x.shape).reshape(-1, f)
    mo = ref.moments_bound(np.where(w, flat, 0.0) if w is not None else flat, -1, w)
    u = ref.unit_roundoff(np.float32)
    e_var = 2 * mo["e_var"].ravel() + (x.shape[0] + 4) * u * mo["var"].ravel()
    return 2 * mo["e_mean"].ravel(), e_var


def _check(out, x, mask=None):
    """Every device holds the reference statistics, within their error bounds."""
    m0, corr, var, count = (np.asarray(a, np.float64).reshape(-1, x.shape[-1]) for a in out)
    mean_ref, var_ref, n_ref = _reference(x, mask)
    mean = m0 + corr  # in float64: the two floats are the mean, nothing rounded
    e_mean, e_var = _bounds(x, mask)
    for d in range(mean.shape[0]):
        np.testing.assert_array_equal(count[d], n_ref)
        ref.assert_within(mean[d], mean_ref, e_mean, "mean")
        ref.assert_within(var[d], var_ref, e_var, "var")


def _vmapped(x, mask=None, **kw):
    if mask is None:
        return jax.jit(jax.vmap(lambda x: _stats(x, None, "d", **kw), axis_name="d"))(x)
    return jax.jit(jax.vmap(lambda x, m: _stats(x, m, "d", **kw), axis_name="d"))(x, mask)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_exact_against_float64(method, case):
    x = _data(case, seed=list(CASES).index(case))
    out = _vmapped(x, method=method)
    _check(out, x)


@pytest.mark.parametrize("method", METHODS)
def test_uneven_empty_devices_and_per_feature_masks(method):
    x = _data("1e4+N(0,1) per-device offsets", n=6, f=4, seed=1)
    rng = np.random.default_rng(2)
    mask = rng.random(x.shape) < 0.5
    mask[3] = False  # an empty device
    mask[5] = True  # a full one
    mask[:, :, 2] = False  # a feature with no valid element anywhere
    mask[:, :, 3] = False
    mask[6, 0, 3] = True  # a feature with one valid element in total
    x[~mask] = np.nan  # padding holds anything
    out = _vmapped(x, mask, method=method)
    assert np.all(np.isfinite(np.asarray(out[0]))) and np.all(np.isfinite(np.asarray(out[2])))
    valid = [0, 1]
    _check([np.asarray(a)[..., valid] for a in out], x[..., valid], mask[..., valid])
    m0, corr, var, count = (np.asarray(a)[..., 2:] for a in out)
    np.testing.assert_array_equal(count[..., 0], 0)  # empty feature: count 0, mean 0, var 0
    np.testing.assert_array_equal((m0 + corr)[..., 0], 0)
    np.testing.assert_array_equal(var, 0)
    np.testing.assert_array_equal(count[..., 1], 1)
    np.testing.assert_array_equal((m0 + corr)[..., 1], x[6, 0, 3])


@pytest.mark.parametrize("method", METHODS)
def test_row_mask_with_an_empty_device_under_pmap(method):
    x = _data("1e3+0.01N(0,1)", seed=3)
    mask = np.random.default_rng(4).random((D, x.shape[1], 1)) < 0.6
    mask[0] = False  # the device with the most data decides nothing special
    out = jax.pmap(lambda x, m: _stats(x, m, "d", method=method), axis_name="d")(x, mask)
    _check(out, x, mask)


@pytest.mark.parametrize("method", METHODS)
def test_axis_index_groups_under_pmap_groups_with_different_offsets(method):
    """Group 0 has a large offset, group 1 not: each group gets its own statistics."""
    x = _data("N(0,1)", seed=5)
    x[0::2] += 1e4
    groups = ((0, 2, 4, 6), (1, 3, 5, 7))
    out = jax.pmap(lambda x: _stats(x, None, "d", groups=groups, method=method),
                   axis_name="d")(x)
    for g in groups:
        _check([np.asarray(a)[list(g)] for a in out], x[list(g)])


@pytest.mark.parametrize("method", METHODS)
def test_nested_names_under_vmap(method):
    x = _data("1e4+N(0,1) per-device offsets", seed=6)
    f = jax.vmap(jax.vmap(lambda x: _stats(x, None, ("h", "d"), method=method),
                          axis_name="d"), axis_name="h")
    out = jax.jit(f)(x.reshape((2, 4) + x.shape[1:]))
    _check([np.asarray(a).reshape((D,) + a.shape[2:]) for a in out], x)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("names", [("d",), ("h", "d")])
def test_shard_map_results_are_invariant(method, names):
    """Under shard_map (check_vma on) the statistics leave with a replicated P() spec."""
    x = _data("1e4+N(0,1) per-device offsets", seed=7)
    mesh = jax.make_mesh((D,), ("d",)) if names == ("d",) else jax.make_mesh((2, 4), ("h", "d"))
    spec = P(names if len(names) > 1 else names[0])
    xs = jax.device_put(x.reshape(-1, x.shape[-1]), NamedSharding(mesh, spec))
    fn = jax.jit(jax.shard_map(
        lambda x: _stats(x, None, names if len(names) > 1 else names[0], method=method),
        mesh=mesh, in_specs=spec, out_specs=P()))
    with jax.set_mesh(mesh):
        out = fn(xs)
    _check(out, x)


# ---- Precision against one device (issue 12 item 7): 8 devices x 32 rows -------------------

def _median_var_error(var, x):
    _, var_ref, _ = _reference(x)
    return float(np.median(np.abs(np.asarray(var, np.float64) - var_ref) / var_ref))


@pytest.mark.parametrize("case", ["1e4+N(0,1) per-device offsets", "1e3+0.01N(0,1)",
                                  "1e4+0.01N(0,1)"])
@pytest.mark.parametrize("method", METHODS)
def test_precision_within_10x_of_one_device(case, method):
    x = _data(case, n=32, f=256, seed=11)
    one = jax.jit(lambda x: moments.finalize(
        moments.local_moments(x, None, make_layout(x.shape, -1)))[1])(x.reshape(-1, x.shape[-1]))
    synced = _vmapped(x, method=method)[2][0]
    err_one, err_synced = _median_var_error(one.ravel(), x), _median_var_error(synced.ravel(), x)
    assert err_synced <= 10 * max(err_one, 1e-8), (err_synced, err_one)


# ---- Collectives in compiled HLO and their payloads ----------------------------------------

_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def hlo_collectives(text: str) -> list[tuple[str, int, bool]]:
    """``(opcode, result bytes, inside a conditional branch)`` for each collective in HLO text.

    The result bytes are what each device receives (all-gather: every device's part)."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    branch: set[str] = set()
    for lines in comps.values():
        for line in lines:
            if " conditional(" in line:
                found = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", line)
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                if listed:
                    found += [c.strip().lstrip("%") for c in listed.group(1).split(",")]
                branch.update(found)
    todo = list(branch)
    while todo:  # computations called from a branch are inside it too
        for line in comps.get(todo.pop(), []):
            for callee in re.findall(r"%([\w.\-]+)", line):
                if callee in comps and callee not in branch:
                    branch.add(callee)
                    todo.append(callee)
    out = []
    for cname, lines in comps.items():
        for line in lines:
            hit = _COLLECTIVE.search(line)
            if hit:
                size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                           for t, dims in _ARRAY.findall(hit.group(1)))
                out.append((hit.group(2), size, cname in branch))
    return out


def _hlo(fn, *args):
    return fn.lower(*args).compile().as_text()


def _ops(text):
    return [(op, cond) for op, _, cond in hlo_collectives(text)]


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_payload_bytes_at_8_devices(masked):
    """gather: (3F [+F]) x D floats to each device; reduce: two rounds of F [+F] and 2F floats,
    whatever D; nothing inside a conditional."""
    f = 1024
    x = _data("N(0,1)", n=4, f=f)
    mask = np.ones((D, 4, 1), bool) if masked else None

    def run(method, devices):
        fn = jax.pmap(lambda x, m: _stats(x, m, "d", method=method), axis_name="d",
                      devices=jax.devices()[:devices])
        m = None if mask is None else mask[:devices]
        return hlo_collectives(_hlo(fn, x[:devices], m))

    extra = 1 if masked else 0  # the row mask's count: one float per feature and device
    assert run("gather", D) == [("all-gather", (3 * f + extra * f) * D * 4, False)]
    reduce8 = sorted(run("reduce", D))
    assert reduce8 == sorted([("all-reduce", (1 + extra) * f * 4, False),
                              ("all-reduce", 2 * f * 4, False)])
    assert sorted(run("reduce", 4)) == reduce8  # independent of the device count


def test_auto_method_follows_the_static_device_count():
    assert combine.resolve_method("auto", combine.AUTO_GATHER_MAX_DEVICES) == "gather"
    assert combine.resolve_method("auto", combine.AUTO_GATHER_MAX_DEVICES + 1) == "reduce"
    x = _data("N(0,1)")
    assert _ops(_hlo(jax.pmap(lambda x: _stats(x, None, "d"), axis_name="d"), x)) == [
        ("all-gather", False)]
    with pytest.raises(ValueError, match="sync_method must be one of"):
        jax.vmap(lambda x: _stats(x, None, "d", method="psum"), axis_name="d")(x)


def test_hlo_collectives_reads_tuple_shapes_and_branches():
    text = """HloModule m

%branch_true (p: f32[4]) -> (f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}, to_apply=%add
}

ENTRY %main (a: f32[2,3], b: s32[]) -> f32[4] {
  %t = (f32[2,3]{1,0}, f32[1]{0}) all-reduce(f32[2,3]{1,0} %a, f32[1]{0} %c), to_apply=%add
  %g = f32[8,3]{1,0} all-gather(f32[1,3]{1,0} %d), dimensions={0}
  %c = (f32[4]) conditional(pred[] %p, f32[4] %x, f32[4] %y), true_computation=%branch_true, \
false_computation=%branch_false
}
"""
    assert hlo_collectives(text) == [("all-reduce", 16, True), ("all-reduce", 28, False),
                                     ("all-gather", 96, False)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gather", "reduce"])
def test_bn_apply_collectives_per_method(method):
    """Through bn_apply under pmap: gather is 1 collective forward and 2 forward+backward;
    reduce is 2 forward and 3 forward+backward; none inside a conditional."""
    params, state = jaxbn.bn_init(9)  # a shape no other test traces: no cached trace reused
    x = jnp.asarray(_data("N(0,1)", n=3, f=9))

    def fwd(x):
        return jaxbn.bn_apply(params, state, x, True, axis_name="d", sync_method=method)[0]

    def fwd_bwd(x):
        return jax.grad(lambda x: jnp.sum(jnp.sin(fwd(x))))(x)

    first = ("all-gather", False) if method == "gather" else ("all-reduce", False)
    rounds = [first] if method == "gather" else [first] * 2
    assert sorted(_ops(_hlo(jax.pmap(fwd, axis_name="d"), x))) == rounds
    assert sorted(_ops(_hlo(jax.pmap(fwd_bwd, axis_name="d"), x))) == sorted(
        rounds + [("all-reduce", False)])


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_bn_apply_under_jit_over_sharded_batch(kind):
    """Plain jit over a batch sharded on a mesh: the two-pass statistics are global (XLA
    all-reduces each pass: 2 forward, 3 forward+backward, no conditional), on Auto and
    Explicit meshes, and equal to the float64 full-batch result."""
    types = (jax.sharding.AxisType.Explicit if kind == "explicit"
             else jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((D,), ("d",), axis_types=types)
    x = _data("1e4+N(0,1) per-device offsets", n=2, f=7, seed=17).reshape(-1, 7)
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    params, state = jaxbn.bn_init(7)

    def fwd(x):
        return jaxbn.bn_apply(params, state, x, True)[0]

    def fwd_bwd(x):
        return jax.grad(lambda x: jnp.sum(jnp.sin(fwd(x))))(x)

    with jax.set_mesh(mesh):
        assert sorted(_ops(_hlo(jax.jit(fwd), xs))) == [("all-reduce", False)] * 2
        assert sorted(_ops(_hlo(jax.jit(fwd_bwd), xs))) == [("all-reduce", False)] * 3
        y = np.asarray(jax.jit(fwd)(xs), np.float64)
    mean_ref, var_ref, _ = _reference(x)
    y_ref = (x - mean_ref) / np.sqrt(var_ref + 1e-5)
    # corrected two-pass over N = 16 values: (N + 8) roundoffs of |y| + 1
    u = np.finfo(np.float32).eps / 2
    assert np.all(np.abs(y - y_ref) <= (16 + 8) * u * (np.abs(y_ref) + 1))


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_platforms", "cpu")
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxbn._src import combine, moments
from jaxbn._src.layout import make_layout
rng = np.random.default_rng(0)
x = (1e4 + rng.normal(size=(4, 6, 3)) + rng.normal(size=(4, 1, 3))).astype(np.float32)
x = x.reshape(-1, 3)
mesh = jax.make_mesh((4,), ("d",), devices=jax.devices())
xs = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")),
                                            x[pid * 12:(pid + 1) * 12], x.shape)
def body(x):
    m = moments.local_moments(x, None, make_layout(x.shape, -1))
    g = combine.combine_across(m, "d", None, method="reduce")
    return g.m0, g.corr, g.m2 / g.count
fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P()))
m0, corr, var = (np.asarray(a.addressable_data(0), np.float64).ravel() for a in fn(xs))
if pid == 0:
    x64 = x.astype(np.float64)
    json.dump({"mean": (m0 + corr).tolist(), "var": var.tolist(), "ref_mean": x64.mean(0).tolist(),
               "ref_var": x64.var(0).tolist(), "x": x.tolist()}, open(out, "w"))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_reduce_across_two_processes(tmp_path):
    """2 processes x 2 CPU devices (gloo): the two all-reduce rounds across processes give the
    float64 statistics of the global batch."""
    import json

    from tests.processes import run_two_processes

    out = tmp_path / "r.json"
    run_two_processes(_WORKER, out, timeout=200)
    r = json.loads(out.read_text())
    e_mean, e_var = _bounds(np.asarray(r["x"]).reshape(4, 6, 3))
    ref.assert_within(r["mean"], r["ref_mean"], e_mean, "mean")
    ref.assert_within(r["var"], r["ref_var"], e_var, "var")
