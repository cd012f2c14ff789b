"""Shape-polymorphic ``jax.export`` (issue 22, item 1): ``jaxbn.bn_apply``,
``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm`` exported with symbolic batch (and
spatial) dimensions, in training and inference mode, plain, masked and with ghost batches;
serialized, deserialized and called on two different sizes.

Every exported result is checked against float64 NumPy (``tests.reference``) within its
rounding bound, and against the direct call of the same function: bit for bit in inference
mode (the same elementwise program), within twice the bound in training mode (there the
count is a value computed when the export runs, not a constant folded at trace time, so XLA
may order the arithmetic differently). Sizes a symbolic dimension cannot decide get a clear
error (ghost batches of a batch not known to be a multiple of their size; a mask that may or
may not broadcast), or, for the one-value-per-feature check, the documented behaviour: refused
when the count is 1 for every value of the symbols, accepted (variance 0) when it may be 1,
and refused at call time by the export's own constraint check when the user declares one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxbn
from tests import reference as ref

RNG = np.random.default_rng(22)
MOMENTUM = 0.9
EPS = 1e-5
U32 = ref.unit_roundoff(np.float32)
ALL_PLATFORMS = ("cpu", "cuda", "tpu")

# (symbolic shape, feature axis, two concrete shapes to call the export with)
LAYOUTS = {
    "dense": ("b, 3", -1, [(2, 3), (5, 3)]),
    "nhwc": ("b, h, w, 3", -1, [(2, 3, 4, 3), (5, 2, 3, 3)]),
    "nchw": ("b, 3, h, w", 1, [(3, 3, 2, 2), (2, 3, 4, 1)]),
}


def _params_state(features=3):
    params = {"scale": jnp.asarray(RNG.uniform(0.5, 2.0, features), jnp.float32),
              "bias": jnp.asarray(RNG.normal(size=features), jnp.float32)}
    state = {"mean": jnp.asarray(RNG.normal(size=features), jnp.float32),
             "var": jnp.asarray(RNG.uniform(0.5, 2.0, features), jnp.float32),
             "count": jnp.asarray(3, jnp.int32)}
    return params, state


def _x(shape, dtype=jnp.float32):
    """Data whose mean is large against its spread (where a naive variance fails)."""
    return jnp.asarray(50.0 + 2.0 * RNG.normal(size=shape), dtype)


def _spec(shape, dtype=jnp.float32, constraints=()):
    return jax.ShapeDtypeStruct(export.symbolic_shape(shape, constraints=constraints), dtype)


def _round_trip(f, *specs, platforms=None):
    """``f`` exported for ``specs``, serialized and deserialized."""
    exported = export.export(jax.jit(f), platforms=platforms)(*specs)
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == (platforms or (jax.default_backend(),))
    return restored


def _mask(kind, shape, axis):
    """None, one flag per example (``(b, 1, ...)``), or one per element; >= 2 valid values per
    feature either way."""
    if kind is None:
        return None
    if kind == "rows":
        m = np.ones((shape[0],) + (1,) * (len(shape) - 1), bool)
        m[-1] = False
        if shape[0] < 3:
            m[-1] = True  # keep two rows: a row holds at least one value per feature
        return m
    m = RNG.uniform(size=shape) < 0.7
    feats = axis % len(shape)
    first = [slice(None)] * len(shape)
    for a in range(len(shape)):
        if a != feats:
            first[a] = slice(0, 1) if a else slice(0, 2)
    m[tuple(first)] = True  # the first two examples' first elements are valid, per feature
    return m


def _padded(x, mask):
    """``x`` with garbage (far from the data) where ``mask`` is False."""
    if mask is None:
        return x
    return jnp.where(jnp.asarray(mask), x, jnp.asarray(1e4, x.dtype))


def _check_train_state(new, state, x64, axis, mask):
    """The new running statistics against the float64 EMA of the batch's, within bound."""
    mo = ref.moments_bound(x64, axis, mask)
    for key in ("mean", "var"):
        batch = mo[key].ravel()
        want = ref.ema(state[key], batch, MOMENTUM)
        bound = ref.ema_bound(state[key], batch, mo[f"e_{key}_stored"].ravel(), MOMENTUM)
        ref.assert_within(new[key], want, bound, f"running {key}")
    assert int(new["count"]) == int(state["count"]) + 1


# ------------------------------------------------------------------------------ bn_apply


@pytest.mark.parametrize("platforms", [None, ALL_PLATFORMS])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bn_apply_eval_export(layout, platforms):
    """Inference mode: the same program as the direct call (bit for bit), right in float64."""
    sym, axis, shapes = LAYOUTS[layout]
    params, state = _params_state()

    def f(p, s, x):
        return jaxbn.bn_apply(p, s, x, False, axis=axis, epsilon=EPS)

    exported = _round_trip(f, params, state, _spec(sym), platforms=platforms)
    for shape in shapes:
        x = _x(shape)
        y, new = exported.call(params, state, x)
        y_direct, _ = jax.jit(f)(params, state, x)
        assert y.shape == shape and y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_direct))
        for key in state:  # the state comes back unchanged
            np.testing.assert_array_equal(np.asarray(new[key]), np.asarray(state[key]))
        x64 = np.asarray(x, np.float64)
        ref.assert_within(y, ref.bn_eval(x64, params["scale"], params["bias"], state["mean"],
                                         state["var"], axis, EPS),
                          ref.bn_eval_bound(x64, params["scale"], params["bias"],
                                            state["mean"], state["var"], axis, EPS), "y")


TRAIN_CASES = [("dense", None, None), ("dense", "rows", None), ("dense", "full", None),
               ("nhwc", None, None), ("nhwc", "rows", None), ("nhwc", "full", None),
               ("nchw", None, None), ("nhwc", "rows", ALL_PLATFORMS)]


@pytest.mark.parametrize("layout,mask_kind,platforms", TRAIN_CASES)
def test_bn_apply_train_export(layout, mask_kind, platforms):
    """Training mode, plain and masked (a mask per example, or per element, also symbolic):
    ``y`` and the new running statistics against float64, and against the direct call."""
    sym, axis, shapes = LAYOUTS[layout]
    params, state = _params_state()

    def f(p, s, x, m):
        return jaxbn.bn_apply(p, s, x, True, axis=axis, momentum=MOMENTUM, epsilon=EPS,
                              mask=m)

    dims = export.symbolic_shape(sym)  # one scope for every spec of one export
    mask_spec = None
    if mask_kind == "rows":
        mask_spec = jax.ShapeDtypeStruct((dims[0],) + (1,) * (len(dims) - 1), jnp.bool_)
    elif mask_kind == "full":
        mask_spec = jax.ShapeDtypeStruct(dims, jnp.bool_)
    exported = _round_trip(f, params, state, jax.ShapeDtypeStruct(dims, jnp.float32),
                           mask_spec, platforms=platforms)
    for shape in shapes:
        mask = _mask(mask_kind, shape, axis)
        x = _padded(_x(shape), mask)
        y, new = exported.call(params, state, x, mask)
        y_direct, new_direct = jax.jit(f)(params, state, x, mask)
        x64 = np.asarray(x, np.float64)
        want = ref.bn_forward(x64, params["scale"], params["bias"], axis, mask, EPS)
        bound = ref.bn_forward_bound(x64, params["scale"], params["bias"], axis, mask, EPS)
        valid = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
        assert y.shape == shape and y.dtype == x.dtype
        ref.assert_within(np.asarray(y)[valid], want[valid], bound[valid], "y")
        ref.assert_within(np.asarray(y)[valid], np.asarray(y_direct)[valid],
                          2 * bound[valid], "y against the direct call")
        _check_train_state(new, state, x64, axis, mask)
        _check_train_state(new_direct, state, x64, axis, mask)


@pytest.mark.parametrize("mask_kind", [None, "rows"])
def test_training_step_export_gradients(mask_kind):
    """Forward and backward exported together (NHWC, symbolic batch and spatial sizes): the
    loss ``sum(y * dy)`` and its gradients against the closed form in float64."""
    sym, axis, shapes = LAYOUTS["nhwc"]
    params, state = _params_state()

    def step(p, s, x, dy, m):
        def loss(p, x):
            y, new = jaxbn.bn_apply(p, s, x, True, momentum=MOMENTUM, epsilon=EPS, mask=m)
            return jnp.sum(y * dy), new

        (value, new), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return value, new, grads

    dims = export.symbolic_shape(sym)
    spec = jax.ShapeDtypeStruct(dims, jnp.float32)
    mask_spec = None
    if mask_kind is not None:
        mask_spec = jax.ShapeDtypeStruct((dims[0], 1, 1, 1), jnp.bool_)
    exported = _round_trip(step, params, state, spec, spec, mask_spec)
    for shape in shapes:
        mask = _mask(mask_kind, shape, axis)
        x = _padded(_x(shape), mask)
        w = np.ones(shape) if mask is None else np.broadcast_to(mask, shape).astype(float)
        dy64 = RNG.normal(size=shape) * w  # the loss ignores the padding
        dy = jnp.asarray(dy64, jnp.float32)
        value, new, (gp, gx) = exported.call(params, state, x, dy, mask)
        x64 = np.asarray(x, np.float64)
        y = ref.bn_forward(x64, params["scale"], params["bias"], axis, mask, EPS)
        e_y = ref.bn_forward_bound(x64, params["scale"], params["bias"], axis, mask, EPS)
        valid = w > 0
        abs_terms = np.abs(y * dy64)[valid]
        ref.assert_within(value, np.sum((y * dy64)[valid]),
                          np.sum((e_y * np.abs(dy64))[valid])
                          + ref.sum_error_bound(abs_terms.sum(), abs_terms.size), "loss")
        dx, dscale, dbias = ref.bn_grads(x64, params["scale"], dy64, axis, mask, EPS)
        e_dx, e_dscale, e_dbias = ref.bn_grads_bound(x64, params["scale"], dy64, axis, mask,
                                                     EPS)
        ref.assert_within(np.asarray(gx)[valid], dx[valid], e_dx[valid], "dx")
        ref.assert_within(gp["scale"], dscale, e_dscale, "dscale")
        ref.assert_within(gp["bias"], dbias, e_dbias, "dbias")
        _check_train_state(new, state, x64, axis, mask)


@pytest.mark.parametrize("method,masked", [("gather", False), ("reduce", False),
                                            ("gather", True)])
def test_synchronized_over_a_vmap_axis_export(method, masked):
    """``axis_name`` over a ``vmap`` axis of 4 members, each with a symbolic batch ``b``: the
    statistics of all ``4 b`` examples (counts as run-time values in both ``sync_method``s)."""
    members, params, state = 4, *_params_state()

    def f(p, s, x, m):
        def one(x, m):
            return jaxbn.bn_apply(p, s, x, True, momentum=MOMENTUM, epsilon=EPS, mask=m,
                                  axis_name="i", sync_method=method)

        return jax.vmap(one, axis_name="i", out_axes=(0, None))(x, m)

    (b,) = export.symbolic_shape("b")
    mask_spec = jax.ShapeDtypeStruct((members, b, 1), jnp.bool_) if masked else None
    exported = _round_trip(f, params, state, jax.ShapeDtypeStruct((members, b, 3), jnp.float32),
                           mask_spec)
    for size in (2, 3):
        mask = None
        if masked:  # uneven valid counts: member i keeps its first i + 1 rows (at most size)
            mask = np.arange(size)[None, :, None] < np.arange(1, members + 1)[:, None, None]
        x = _padded(_x((members, size, 3)), mask)
        y, new = exported.call(params, state, x, mask)
        flat = np.asarray(x, np.float64).reshape(members * size, 3)
        m = None if mask is None else mask.reshape(members * size, 1)
        want = ref.bn_forward(flat, params["scale"], params["bias"], -1, m, EPS)
        bound = ref.bn_forward_bound(flat, params["scale"], params["bias"], -1, m, EPS)
        valid = np.ones(flat.shape, bool) if m is None else np.broadcast_to(m, flat.shape)
        got = np.asarray(y).reshape(members * size, 3)
        # the bound holds for the sums in any order, pooled over members too (see
        # reference.moments_bound)
        ref.assert_within(got[valid], want[valid], bound[valid], "y")
        _check_train_state(new, state, flat, -1, m)


@pytest.mark.parametrize("masked", [False, True])
def test_ghost_batches_export_with_a_batch_declared_a_multiple(masked):
    """``virtual_batch_size=4`` with the batch declared ``4*k``: each group of 4 examples is
    normalized with its own statistics (float64, group by group); the running statistics move
    toward the groups' average."""
    size, params, state = 4, *_params_state()

    def f(p, s, x, m):
        return jaxbn.bn_apply(p, s, x, True, momentum=MOMENTUM, epsilon=EPS, mask=m,
                              virtual_batch_size=size)

    dims = export.symbolic_shape("4*k, 3")
    mask_spec = jax.ShapeDtypeStruct((dims[0], 1), jnp.bool_) if masked else None
    exported = _round_trip(f, params, state, jax.ShapeDtypeStruct(dims, jnp.float32),
                           mask_spec)
    for groups in (2, 3):
        shape = (size * groups, 3)
        mask = None
        if masked:
            mask = np.ones((shape[0], 1), bool)
            mask[size - 1::size] = False  # the last example of each group is padding
        x = _padded(_x(shape), mask)
        y, new = exported.call(params, state, x, mask)
        x64 = np.asarray(x, np.float64).reshape(groups, size, 3)
        m = None if mask is None else mask.reshape(groups, size, 1)
        means, vars_, e_means, e_vars = [], [], [], []
        for g in range(groups):
            mg = None if m is None else m[g]
            want = ref.bn_forward(x64[g], params["scale"], params["bias"], -1, mg, EPS)
            bound = ref.bn_forward_bound(x64[g], params["scale"], params["bias"], -1, mg, EPS)
            valid = np.ones((size, 3), bool) if mg is None else np.broadcast_to(mg, (size, 3))
            yg = np.asarray(y).reshape(groups, size, 3)[g]
            ref.assert_within(yg[valid], want[valid], bound[valid], f"y of group {g}")
            mo = ref.moments_bound(x64[g], -1, mg)
            means.append(mo["mean"].ravel())
            vars_.append(mo["var"].ravel())
            e_means.append(mo["e_mean_stored"].ravel())
            e_vars.append(mo["e_var_stored"].ravel())
        for key, per_group, errs in (("mean", means, e_means), ("var", vars_, e_vars)):
            avg = np.mean(per_group, axis=0)
            e_avg = np.mean(errs, axis=0) + ref.sum_error_bound(
                np.mean(np.abs(per_group), axis=0), groups, ulps=2)
            ref.assert_within(new[key], ref.ema(state[key], avg, MOMENTUM),
                              ref.ema_bound(state[key], avg, e_avg, MOMENTUM), f"running {key}")


@pytest.mark.parametrize("sym", ["b, 3", "2*k, 3"])
def test_ghost_batches_of_a_batch_not_known_to_divide_raise(sym):
    """A batch ``b`` (or ``2*k``) may not be a multiple of 4: a clear error at export time."""
    params, state = _params_state()
    f = jax.jit(lambda p, s, x: jaxbn.bn_apply(p, s, x, True, virtual_batch_size=4))
    with pytest.raises(ValueError, match=r"not known to be divisible by "
                                         r"virtual_batch_size=4.*symbolic_shape\('4\*k"):
        export.export(f)(params, state, _spec(sym))


def test_a_mask_that_may_not_broadcast_raises():
    """A mask of ``(c, 1)`` against ``x`` of ``(b, 3)`` broadcasts only when ``c`` is 1 or
    ``b``: not decidable when exporting, so refused with a clear error."""
    params, state = _params_state()
    f = jax.jit(lambda p, s, x, m: jaxbn.bn_apply(p, s, x, True, mask=m))
    b, c = export.symbolic_shape("b, c")
    with pytest.raises(ValueError, match=r"mask of shape \(c, 1\) does not broadcast to x's "
                                         r"shape \(b, 3\) \(with symbolic sizes"):
        export.export(f)(params, state, jax.ShapeDtypeStruct((b, 3), jnp.float32),
                         jax.ShapeDtypeStruct((c, 1), jnp.bool_))


# ------------------------------------------------------------------ one value per feature


@pytest.mark.parametrize("case", ["features", "ghost"])
def test_one_value_per_feature_for_every_symbol_value_raises(case):
    """Symbolic sizes whose count is 1 whatever the symbols are refused: ``x`` of ``(1, c)``
    (symbolic features), and ghost batches of one example."""
    if case == "features":
        (c,) = export.symbolic_shape("c")
        params = {"scale": jax.ShapeDtypeStruct((c,), jnp.float32)}
        state = {"mean": jax.ShapeDtypeStruct((c,), jnp.float32),
                 "var": jax.ShapeDtypeStruct((c,), jnp.float32)}
        spec, kw = jax.ShapeDtypeStruct((1, c), jnp.float32), {}
    else:
        params, state = _params_state()
        spec, kw = _spec("k, 3"), {"virtual_batch_size": 1}
    f = jax.jit(lambda p, s, x: jaxbn.bn_apply(p, s, x, True, **kw))
    with pytest.raises(ValueError, match="gives 1 value per feature"):
        export.export(f)(params, state, spec)


def test_one_value_per_feature_undecidable_is_accepted_with_variance_zero():
    """``b`` may be 1: the export is made, and a batch of one gives what
    ``allow_single_value=True`` gives: variance 0, so ``y = bias`` exactly, and the running
    variance moves toward 0 (documented in the export guide and ``check_enough_elements``)."""
    params, state = _params_state()

    def f(p, s, x):
        return jaxbn.bn_apply(p, s, x, True, momentum=MOMENTUM, epsilon=EPS)

    exported = _round_trip(f, params, state, _spec("b, 3"))
    x = _x((1, 3))
    y, new = exported.call(params, state, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(params["bias"])[None])
    x64 = np.asarray(x, np.float64)
    _check_train_state(new, state, x64, -1, None)
    y_allowed, _ = jax.jit(lambda p, s, x: jaxbn.bn_apply(
        p, s, x, True, momentum=MOMENTUM, epsilon=EPS, allow_single_value=True))(params, state, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_allowed))


def test_one_value_per_feature_refused_at_call_by_a_constraint():
    """Declared ``b >= 2``: the export runs for ``b = 2`` and JAX refuses ``b = 1`` when the
    export is called (its shape-constraint check), before anything is computed."""
    params, state = _params_state()
    f = jax.jit(lambda p, s, x: jaxbn.bn_apply(p, s, x, True, momentum=MOMENTUM, epsilon=EPS))
    exported = _round_trip(f, params, state, _spec("b, 3", constraints=("b >= 2",)))
    x = _x((2, 3))
    y, _ = exported.call(params, state, x)
    x64 = np.asarray(x, np.float64)
    ref.assert_within(y, ref.bn_forward(x64, params["scale"], params["bias"], eps=EPS),
                      ref.bn_forward_bound(x64, params["scale"], params["bias"], eps=EPS), "y")
    with pytest.raises(ValueError) as info:
        exported.call(params, state, _x((1, 3)))
    assert "constraint b >= 2" in str(info.value.__cause__)


# ----------------------------------------------------------------------- Flax wrappers


@pytest.mark.parametrize("train", [False, True])
def test_linen_export(train):
    """``jaxbn.linen.BatchNorm`` on NHWC input with symbolic batch and spatial sizes."""
    import jaxbn.linen

    sym, axis, shapes = LAYOUTS["nhwc"]
    module = jaxbn.linen.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    variables = module.init(jax.random.key(0), jnp.ones((2, 2, 2, 3)),
                            use_running_average=False)
    params, state = _params_state()
    variables = {"params": {k: params[k] for k in ("scale", "bias")},
                 "batch_stats": {k: state[k] for k in ("mean", "var")}}

    def f(v, x):
        return module.apply(v, x, use_running_average=not train, mutable=["batch_stats"])

    exported = _round_trip(f, variables, _spec(sym))
    for shape in shapes:
        x = _x(shape)
        y, updates = exported.call(variables, x)
        y_direct, _ = jax.jit(f)(variables, x)
        x64 = np.asarray(x, np.float64)
        if train:
            bound = ref.bn_forward_bound(x64, params["scale"], params["bias"], axis, eps=EPS)
            ref.assert_within(y, ref.bn_forward(x64, params["scale"], params["bias"], axis,
                                                eps=EPS), bound, "y")
            ref.assert_within(y, y_direct, 2 * bound, "y against the direct call")
            _check_train_state(dict(updates["batch_stats"], count=state["count"] + 1), state,
                               x64, axis, None)
        else:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(y_direct))
            ref.assert_within(y, ref.bn_eval(x64, params["scale"], params["bias"],
                                             state["mean"], state["var"], axis, EPS),
                              ref.bn_eval_bound(x64, params["scale"], params["bias"],
                                                state["mean"], state["var"], axis, EPS), "y")
            for key in ("mean", "var"):
                np.testing.assert_array_equal(np.asarray(updates["batch_stats"][key]),
                                              np.asarray(state[key]))


@pytest.mark.parametrize("train", [False, True])
def test_nnx_export(train):
    """``jaxbn.nnx.BatchNorm`` as a pure function (``nnx.split``, ``nnx.merge``, its state as
    plain dicts) on NHWC input with symbolic batch and spatial sizes."""
    from flax import nnx

    import jaxbn.nnx

    sym, axis, shapes = LAYOUTS["nhwc"]
    layer = jaxbn.nnx.BatchNorm(3, momentum=MOMENTUM, epsilon=EPS, rngs=nnx.Rngs(0))
    params, state = _params_state()
    for key in ("scale", "bias"):
        getattr(layer, key)[...] = params[key]
    for key in ("mean", "var"):
        getattr(layer, key)[...] = state[key]
    graphdef, template = nnx.split(layer)
    pure = nnx.to_pure_dict(template)

    def f(values, x):
        filled = nnx.clone(template)
        nnx.replace_by_pure_dict(filled, values)
        model = nnx.merge(graphdef, filled)
        if train:
            model.train()
        else:
            model.eval()
        y = model(x)
        return y, nnx.to_pure_dict(nnx.state(model))

    exported = _round_trip(f, pure, _spec(sym))
    for shape in shapes:
        x = _x(shape)
        y, after = exported.call(pure, x)
        y_direct, _ = jax.jit(f)(pure, x)
        x64 = np.asarray(x, np.float64)
        if train:
            bound = ref.bn_forward_bound(x64, params["scale"], params["bias"], axis, eps=EPS)
            ref.assert_within(y, ref.bn_forward(x64, params["scale"], params["bias"], axis,
                                                eps=EPS), bound, "y")
            ref.assert_within(y, y_direct, 2 * bound, "y against the direct call")
            _check_train_state(dict(after, count=state["count"] + 1), state, x64, axis, None)
        else:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(y_direct))
            ref.assert_within(y, ref.bn_eval(x64, params["scale"], params["bias"],
                                             state["mean"], state["var"], axis, EPS),
                              ref.bn_eval_bound(x64, params["scale"], params["bias"],
                                                state["mean"], state["var"], axis, EPS), "y")
            for key in ("mean", "var"):
                np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(state[key]))


def test_synchronized_export_with_symbolic_shapes_is_a_clear_error():
    """JAX 0.10.2 cannot call (and may crash refining) a symbolic export whose statistics are
    all-reduced over shard_map axes: jaxbn refuses it while tracing."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    params, state = jaxbn.bn_init(3)

    def body(x):
        return jaxbn.bn_apply(params, state, x, True, axis_name="d")[0]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("2*b, 3"), jnp.float32,
                                sharding=jax.sharding.NamedSharding(mesh, P("d")))
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match="symbolic"):
        export.export(f)(spec)


def test_symbolic_vmap_axis_name_is_a_clear_error():
    params, state = jaxbn.bn_init(3)
    f = jax.jit(jax.vmap(lambda x: jaxbn.bn_apply(params, state, x, True, axis_name="b")[0],
                         axis_name="b"))
    with pytest.raises(NotImplementedError, match="symbolic size"):
        export.export(f)(jax.ShapeDtypeStruct(export.symbolic_shape("n, 2, 3"), jnp.float32))
