"""Conversion time of `rc.convert(model)` against `keras.models.clone_model`.

What is measured
----------------
``rc.convert`` rebuilds a model with ``keras.models.clone_model`` (swapping
every BatchNormalization for a BatchRenormalization) and then copies the
weights layer by layer, so a plain ``clone_model`` of the same model is the
natural floor. For each model, three variants are timed, all on the same
source model and in the same run:

  clone          keras.models.clone_model(model)                 (baseline)
  clone+weights  clone_model(model) then .set_weights(model.get_weights())
                 (for reference: clone_model does not copy weights,
                 convert does)
  convert        rc.convert(model)

Models (all built with ``weights=None``; no downloads):

* ``inception_v3``: keras.applications.InceptionV3, input 75x75x3 (the
  smallest it accepts), 94 BN layers.
* ``nasnet_mobile``: keras.applications.NASNetMobile, input 32x32x3 (the
  smallest it accepts with weights=None), 192 BN layers.
* ``chain_250``, ``chain_500``, ``chain_1000``: a synthetic functional chain
  Input(16) -> [Dense(16) -> BatchNormalization -> ReLU] x n, with n = 83,
  166, 333 blocks, i.e. 250, 499, 1000 layers counting the input layer.
  These show whether the time grows linearly with the number of layers.
  Keras's own graph walk (``keras.Model(...)``, ``clone_model``) recurses
  once per layer, so a 1000-layer chain exceeds Python's default recursion
  limit of 1000 in Keras itself; the script raises it (``--recursion-limit``,
  default 20000) before building anything.

After one untimed warm-up call of every variant on every model, the variants
are run round-robin for ``--reps`` rounds: in each round every model runs
every variant once, and the order of the variants rotates from round to
round, so slow phases of a shared, noisy machine fall on all variants alike.
A ``gc.collect()`` precedes every timed call (untimed) so that the garbage of
the previous copies is not charged to the next one. Reported: the median of
the rounds; ratios are ratios of these medians against ``clone`` of the same
model measured in the same run; "paired" is the median over rounds of the
per-round ratio (a noise cross-check).

Targets (printed as PASS / FAIL):

* ``convert`` at most 1.5x ``clone`` on every model;
* linear in layers: on the chains, convert's seconds per layer at 1000
  layers at most 1.5x its seconds per layer at 250 layers (the log-log slope
  of time against layers is printed too; 1.0 is linear).

Examples::

    python benchmarks/convert.py            # full run, ~4-6 min on 2 cores
    python benchmarks/convert.py --quick    # ~1 min smoke run
    python benchmarks/convert.py --reps 7 --models chain_250 chain_1000
"""

import gc
import sys
import time

import numpy as np

import _common as common

VARIANTS = ("clone", "clone+weights", "convert")
MODELS = ("inception_v3", "nasnet_mobile", "chain_250", "chain_500",
          "chain_1000")
CHAIN_BLOCKS = {"chain_250": 83, "chain_500": 166, "chain_1000": 333}
TARGET_RATIO = 1.5
TARGET_LINEAR = 1.5
SEED = 1234


# --- models ---------------------------------------------------------------

def build_chain(blocks, name):
    import keras
    from keras import layers

    inputs = keras.Input((16,), name="x")
    x = inputs
    for _ in range(blocks):
        x = layers.Dense(16)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    return keras.Model(inputs, x, name=name)


def build_model(name):
    import keras

    keras.utils.set_random_seed(SEED)
    if name == "inception_v3":
        return keras.applications.InceptionV3(
            weights=None, input_shape=(75, 75, 3), classes=10)
    if name == "nasnet_mobile":
        return keras.applications.NASNetMobile(
            weights=None, input_shape=(32, 32, 3), classes=10)
    return build_chain(CHAIN_BLOCKS[name], name)


# --- timing ---------------------------------------------------------------

def run_variant(variant, model):
    import keras
    import renorm_convert as rc

    if variant == "clone":
        return keras.models.clone_model(model)
    if variant == "clone+weights":
        new = keras.models.clone_model(model)
        new.set_weights(model.get_weights())
        return new
    if variant == "convert":
        return rc.convert(model)
    raise ValueError(variant)


def timed(variant, model):
    gc.collect()
    t0 = time.perf_counter()
    new = run_variant(variant, model)
    elapsed = time.perf_counter() - t0
    del new
    return elapsed


def main(argv=None):
    parser = common.parser(__doc__)
    common.add_quick(parser, "smoke run: 2 rounds, chains only + InceptionV3")
    parser.add_argument("--reps", type=int, default=None,
                        help="round-robin rounds (default 5, quick 2)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="models to time (default: all; quick: "
                             "inception_v3 and the chains)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up call of each variant")
    parser.add_argument("--recursion-limit", type=int, default=20000,
                        help="sys.setrecursionlimit (Keras recurses once per "
                             "layer of a chain)")
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), args.recursion_limit))

    q = args.quick
    args.reps = args.reps or (2 if q else 5)
    names = args.models or [m for m in MODELS
                            if not (q and m == "nasnet_mobile")]

    import renorm_convert as rc

    log = common.stopwatch()
    print(common.versions())
    print(f"rounds={args.reps} warmup={'no' if args.no_warmup else 1} "
          f"models={names} recursion limit={sys.getrecursionlimit()}")

    models, info = {}, {}
    for name in names:
        t0 = time.perf_counter()
        m = build_model(name)
        models[name] = m
        info[name] = (len(m.layers), common.count_bn(m),
                      m.count_params())
        log(f"built {name}: {info[name][0]} layers, {info[name][1]} BN, "
            f"{info[name][2]:,} params, input {tuple(m.input.shape[1:])} "
            f"in {time.perf_counter() - t0:.1f}s")

    # Sanity check (and warm-up): convert swaps every BN.
    for name, m in models.items():
        conv = rc.convert(m)
        n_rc = common.count_layers(conv, rc.BatchRenormalization)
        if n_rc != info[name][1]:
            raise SystemExit(f"{name}: convert made {n_rc} "
                             f"BatchRenormalization layers, expected "
                             f"{info[name][1]}")
        del conv
        if not args.no_warmup:
            for v in VARIANTS:
                if v != "convert":
                    timed(v, m)
    log("warm-up done")

    times = {(n, v): [] for n in names for v in VARIANTS}
    for r, order in common.round_robin(VARIANTS, args.reps):
        for name in names:
            for v in order:
                times[(name, v)].append(timed(v, models[name]))
        log(f"round {r + 1}/{args.reps} done")

    med = {key: float(np.median(t)) for key, t in times.items()}

    common.print_rule()
    print("seconds: median of the rounds [min - max]; vs clone: ratio of "
          "medians;\npaired: median over rounds of per-round ratios")
    hdr = (f"{'model':<14}{'layers':>7}{'BN':>5} {'variant':<14}"
           f"{'seconds':>8} {'[min - max]':>16}{'vs clone':>9}{'paired':>8}"
           f"{'ms/layer':>9}  target")
    common.print_header(hdr)
    verdicts = []
    for name in names:
        layers, bn, _ = info[name]
        base = np.asarray(times[(name, "clone")])
        for v in VARIANTS:
            t = np.asarray(times[(name, v)])
            ratio = med[(name, v)] / med[(name, "clone")]
            paired = common.paired(t, base)
            target = ""
            if v == "convert":
                ok = ratio <= TARGET_RATIO
                verdicts.append(ok)
                target = common.verdict(ok, f"<= {TARGET_RATIO}x")
            lead = (f"{name:<14}{layers:>7}{bn:>5}" if v == VARIANTS[0]
                    else " " * 26)
            print(f"{lead} {v:<14}{med[(name, v)]:8.3f} "
                  f"{f'[{t.min():.3f} - {t.max():.3f}]':>16}{ratio:8.2f}x"
                  f"{paired:7.2f}x{med[(name, v)] / layers * 1e3:9.3f}  "
                  f"{target}")

    chains = [n for n in names if n in CHAIN_BLOCKS]
    if len(chains) >= 2:
        print("\nScaling with the number of layers (synthetic chains):")
        lay = np.array([info[n][0] for n in chains], float)
        for v in VARIANTS:
            secs = np.array([med[(n, v)] for n in chains])
            slope = float(np.polyfit(np.log(lay), np.log(secs), 1)[0])
            per = secs / lay * 1e3
            growth = per[-1] / per[0]
            cols = "  ".join(f"{int(l)}: {p:.3f}" for l, p in zip(lay, per))
            line = (f"  {v:<14} ms/layer  {cols}   "
                    f"({int(lay[-1])} vs {int(lay[0])}: {growth:.2f}x, "
                    f"log-log slope {slope:.2f})")
            if v == "convert":
                ok = growth <= TARGET_LINEAR
                verdicts.append(ok)
                line += "  " + common.verdict(
                    ok, f"per-layer growth <= {TARGET_LINEAR}x")
            print(line)
    log("done")
    print("\n" + common.overall(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
