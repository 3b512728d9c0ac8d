"""The transfer suite: its datasets (splits by image), the methods as loss sections, one step of each, the report."""

import math

import pytest
import torch

from studies import suite_data as sd
from studies import transfer as tf
from studies.small_batch import Split, SmallTwoTower


@pytest.fixture(scope="module")
def fashion():
    return sd.build("fashion")


@pytest.fixture(scope="module")
def glyphs():
    why = sd.glyph_font_missing()
    if why:
        pytest.skip(f"glyph set unavailable: {why}")
    return sd.build("glyphs")


def _pool_ids(split):
    return set(split.tiles[split.tiles >= 0].tolist())


def test_fashion_splits_are_disjoint_by_image_with_held_out_prompts(fashion):
    ids = {k: _pool_ids(s) for k, s in fashion.splits.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert fashion.metric == "zeroshot"
    C, P, L = fashion.class_tokens.shape
    assert (C, P) == (10, 5) and L == fashion.splits["train"].tokens.shape[1]
    assert len(set(fashion.splits["train"].captions)) > 10  # varied captions, not one per class
    for k, s in fashion.splits.items():
        assert len(fashion.labels[k]) == len(s) and int(fashion.labels[k].max()) < 10
    assert fashion.pixels.shape[1] == sd.FASHION_SIZE ** 2


def test_glyph_splits_keep_identical_drawings_together(glyphs):
    def keys(split):
        return {glyphs.pixels[i].numpy().tobytes() for i in _pool_ids(split)}

    k = {name: keys(s) for name, s in glyphs.splits.items()}
    assert not k["train"] & k["val"] and not k["train"] & k["test"] and not k["val"] & k["test"]
    caps = glyphs.splits["train"].captions + glyphs.splits["test"].captions
    assert "latin small letter a" in caps or "latin small letter a" in glyphs.splits["val"].captions
    assert len(glyphs.splits["test"]) > 300 and glyphs.vocab_size > 500


def test_every_method_section_builds_and_the_recipe_is_adapted():
    for m in tf.available_methods():
        sec, ls0, lb0 = tf.method_section(m, 64, 12, 50)
        loss = tf.build_loss(sec, 100, 64)
        assert math.isfinite(ls0)
        assert (lb0 is None) == (m != "siglip")
        if m == "amorlip":
            est = sec["estimator"]
            assert est["amortizer"]["init_log_z"] == pytest.approx(math.log(64))
            assert est["beta"]["warmup_epochs"] == 3
            assert sec == tf.method_section(m, 64, 12, 50)[0]
            assert type(loss.estimator).__name__ == "AmortizedEstimator"
        if m == "neuclip":  # the shipped small-batch recipe's section, not the preset's defaults
            assert sec == tf.recipe_loss_section(tf.RECIPES / "neuclip-small-batch.yaml")
            assert type(loss.estimator).__name__ == "NormalizerNetworkEstimator"
    over = tf.method_section("amorlip", 16, 12, 50, tf.VARIANTS["inner_lr_1e-3"])[0]
    assert over["estimator"]["lr"] == 1e-3 and over["estimator"]["objective"]  # merged, not replaced
    assert tf.method_section("amorlip", 16, 12, 50, tf.VARIANTS["in_batch_control"])[0]["estimator"] == {"name": "in_batch"}
    wrapped = tf.method_section("amorlip", 64, 12, 50, tf.VARIANTS["exact_positive_c0.03"])[0]
    assert wrapped["objective"]["pos_weight"] == 0.03 and wrapped["estimator"]["name"] == "exact_positive"
    assert wrapped["estimator"]["inner"]["name"] == "amortized"  # the recipe's estimator, adapted, inside
    inner = tf.adapt_small_batch({"estimator": {"name": "exact_positive", "inner": {
        "name": "amortized", "amortizer": {"name": "residual_mlp"}, "beta": {"name": "beta_warmup"}}}}, 64, 12, 50)
    assert inner["estimator"]["inner"]["amortizer"]["init_log_z"] == pytest.approx(math.log(64))  # found inside the wrapper
    assert type(tf.build_loss(wrapped, 100, 64).estimator).__name__ == "ExactPositive"
    with pytest.raises(ValueError, match="unknown method"):
        tf.method_section("nope", 16, 1, 1)


@pytest.mark.parametrize("method", ["clip", "siglip", "dcl", "sogclr", "fastclip", "scent", "amorlip", "neuclip"])
def test_two_steps_of_every_method_on_fashion(fashion, method):
    row = tf.train(tf.Run("fashion", method, 16, 0, "val", epochs=1, max_steps=2), fashion)
    assert row["steps"] == 2 and 0.0 <= row["quality"] <= 1.0
    assert row["epochs_log"][0]["scale"] == pytest.approx(row["scale"])
    if method in ("sogclr", "fastclip", "scent", "amorlip", "neuclip"):
        assert math.isfinite(row["norm_err"]) and math.isfinite(row["batch_err"])
        assert "w_mean" in row and "r2_last" in row["epochs_log"][0]


def test_normaliser_error_of_the_full_batch_is_zero():
    # with B = N and every row drawn, the in-batch sum IS the exact partition: both errors vanish
    torch.manual_seed(0)
    n = 24
    pixels = torch.randn(n, 12)
    split = Split(torch.cat([torch.arange(n)[:, None], torch.full((n, 3), -1)], 1), ["x"] * n,
                  torch.randint(2, 9, (n, 5)))
    model = SmallTwoTower(pixels, 10).eval()
    loss = tf.build_loss({"objective": {"name": "linearized", "pos_weight": 0.001}, "estimator": "in_batch"}, n, 64)
    e = tf.normaliser_error(model, loss, split, batch=n, rows=n, rounds=2)
    assert e["norm_err"] == pytest.approx(0.0, abs=1e-4) and e["batch_err"] == pytest.approx(0.0, abs=1e-4)
    half = tf.normaliser_error(model, loss, split, batch=n // 2, rows=n, rounds=2)
    assert half["batch_err"] > 0


def _row(d, m, b, s, q, split="test", lr=1e-3):
    return {"dataset": d, "method": m, "tag": m, "batch": b, "seed": s, "quality": q, "split": split,
            "lr": lr, "variant": "", "warnings": []}


def test_lr_choice_and_the_report():
    rows = [_row("emoji", "clip", 16, 0, 0.2, "val", 1e-3), _row("emoji", "clip", 16, 0, 0.3, "val", 2e-3)]
    assert tf.chosen_lr(rows, "emoji", "clip", 16) == 2e-3
    assert tf.chosen_lr(rows, "emoji", "amorlip", 16) is None
    test = [_row(d, m, 16, s, q + 0.01 * s) for d in ("emoji", "glyphs") for m, q in (("clip", 0.2), ("amorlip", 0.25))
            for s in (0, 1)]
    md = tf.markdown_report(test)
    assert "**emoji**" in md and "**average over datasets**" in md and "+0.050 ± 0.000" in md and "(1 seed)" not in md


def test_an_lr_search_run_is_reused_as_the_test_run_of_its_seed(fashion, tmp_path):
    run = tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=1, max_steps=2)
    row = tf.train(run, fashion)
    assert 0.0 <= row["quality_test"] <= 1.0 and "quality_val" not in row and "zeroshot_top1" in row
    jsonl = tmp_path / "test.runs.jsonl"
    test = tf.Run("fashion", "clip", 16, 0, "test", lr=1e-3, epochs=1, max_steps=2)
    other = tf.Run("fashion", "clip", 16, 1, "test", lr=1e-3, epochs=1, max_steps=2)
    assert tf.reuse_trained([row], [test, other], jsonl) == 1
    got = tf.load_rows(jsonl)[test.key()]
    assert got["quality"] == row["quality_test"] and got["quality_val"] == row["quality"] and got["split"] == "test"
    assert got["reused_from"] == run.key() and "zeroshot_top1" not in got  # the val split's metric stays behind
    assert tf.reuse_trained([row], [test, other], jsonl) == 0  # already there
    assert tf.row_trained_as(got) == tf.trained_as(test) == tf.row_trained_as(row)


def test_a_variant_run_is_reused_where_the_same_training_is_planned_again(fashion, tmp_path):
    v = "robust_rho_1"
    run = tf.Run("fashion", "neuclip", 16, 0, "val", lr=1e-3, epochs=1, variant=v, overrides=tf.VARIANTS[v], max_steps=2)
    row = tf.train(run, fashion)
    jsonl = tmp_path / "test.runs.jsonl"
    same = tf.Run("fashion", "neuclip", 16, 0, "test", lr=1e-3, epochs=1, variant=v, overrides=tf.VARIANTS[v],
                  max_steps=2)
    other = tf.Run("fashion", "neuclip", 16, 0, "test", lr=1e-3, epochs=1, variant="robust_rho_2",
                   overrides=tf.VARIANTS["robust_rho_2"], max_steps=2)
    longer = tf.Run("fashion", "neuclip", 16, 0, "test", lr=1e-3, epochs=1, variant=v, overrides=tf.VARIANTS[v])
    assert tf.reuse_trained([row], [same, other, longer], jsonl) == 1
    assert set(tf.load_rows(jsonl)) == {same.key()}


def test_a_variants_scale_lr_is_the_runs_own_and_its_row_serves_the_search(fashion, tmp_path):
    # a variant that gives the scale its own lr trains what the search's temperature-lr arm trains:
    # one is reused for the other, and the copied row carries the run's fields (no variant)
    var = tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=1, max_steps=2, variant="own",
                 overrides={"logit_scale_lr": 0.0})
    arm = tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=1, max_steps=2, logit_scale_lr=0.0)
    assert var.scale_lr() == arm.scale_lr() == 0.0 and var.key() != arm.key()
    row = tf.train(var, fashion)
    assert row["scale"] == pytest.approx(1 / 0.07, rel=1e-6)  # a frozen scale: the lr reached its own group
    jsonl = tmp_path / "lr.runs.jsonl"
    assert tf.reuse_trained([row], [arm], jsonl) == 1
    got = tf.load_rows(jsonl)[arm.key()]
    assert got["variant"] == "" and got["logit_scale_lr"] == 0.0 and got["overrides"] == {} and got["tag"] == "clip"
    assert tf.chosen_setting([got], "fashion", "clip", 16) == (1e-3, None, 0.0)


def test_a_variant_may_give_the_logit_scale_its_own_lr(fashion):
    # the FastCLIP family's temperature lr: a group of its own, scheduled as the others
    base = tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=1, max_steps=2)
    frozen = tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=1, max_steps=2, logit_scale_lr=0.0)
    assert tf.method_section("clip", 16, 1, 1, {"logit_scale_lr": 0.0})[0] == tf.method_section("clip", 16, 1, 1)[0]
    assert tf.train(frozen, fashion)["scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    assert tf.train(base, fashion)["scale"] != pytest.approx(1 / 0.07, rel=1e-6)
    assert frozen.key() != base.key() and '"logit_scale_lr"' not in base.key()


def test_every_cell_searches_the_temperature_lr_at_its_best_grid_point():
    """After the (lr, beta2) grid, each cell tries the logit scale's own lr at its best grid point; the
    choice is over all of them, and the test runs, the variants and the report follow it."""
    b2 = tf.rule_beta2(16)
    grid = [{**_row("emoji", m, 16, 0, q, "val", lr), "epochs": 96, "beta2": b}
            for m in ("clip", "dcl") for lr, b, q in ((1e-3, 0.98, 0.30), (2e-3, 0.98, 0.32), (1e-3, b2, 0.35))]
    arm = tf.scale_lr_runs(grid)
    assert [(r.method, r.lr, r.beta2, r.logit_scale_lr, r.split, r.seed) for r in arm] == [
        ("clip", 1e-3, b2, 1e-4, "val", 0), ("dcl", 1e-3, b2, 1e-4, "val", 0)]
    assert tf.scale_lr_runs(grid, ()) == []
    rows = grid + [{**_row("emoji", "clip", 16, 0, 0.40, "val", 1e-3), "epochs": 96, "beta2": b2, "logit_scale_lr": 1e-4},
                   {**_row("emoji", "dcl", 16, 0, 0.30, "val", 1e-3), "epochs": 96, "beta2": b2, "logit_scale_lr": 1e-4}]
    assert tf.chosen_setting(rows, "emoji", "clip", 16, 96) == (1e-3, b2, 1e-4)
    assert tf.chosen_setting(rows, "emoji", "dcl", 16, 96) == (1e-3, b2, None)
    assert tf.scale_lr_runs(rows) == arm  # the arm's point is the grid's best, whatever the arm found
    test = tf.test_runs(rows, ("emoji",), ("clip", "dcl"), (16,), (1,), {"emoji": 96})
    assert [(r.method, r.logit_scale_lr) for r in test] == [("clip", 1e-4), ("dcl", None)]
    assert tf.variant_run(rows, "emoji", "clip", 16, 1, "val", 96, "recipe").logit_scale_lr == 1e-4
    assert tf.variant_run(rows, "emoji", "clip", 16, 1, "val", 96, "robust_rho_2_scale_lr_0.0003").scale_lr() == 3e-4
    tested = [{**r, "split": "test", "seed": 1} for r in rows if r["method"] == "clip"]
    kept = tf.at_chosen_lr(tested, rows)
    assert [r.get("logit_scale_lr") for r in kept] == [1e-4]  # the same (lr, beta2) at the encoders' lr drops out
    md = tf.markdown_report([{**r, "split": "test"} for r in (rows[5], rows[-2])])
    assert "scale lr (B=16/64/256)" in md and "| 1e-04 |" in md and "| enc |" in md


def test_the_convergence_and_long_stages_train_the_whole_chosen_setting():
    """A convergence or long run trains the cell's chosen (lr, beta2, temperature lr), not its lr alone,
    and the convergence table reads the longer runs at that setting."""
    b2 = tf.rule_beta2(256)
    rows = [{**_row("emoji", "clip", 256, 0, q, "val", 4e-3), "epochs": 96, "beta2": 0.98, **sl}
            for q, sl in ((0.28, {}), (0.33, {"logit_scale_lr": 1e-4}))]
    conv = tf.convergence_runs(rows, ("emoji",), methods=("clip",), batches=(256, 16), epochs=(192,),
                               suite_epochs={"emoji": 96})
    assert [(r.lr, r.beta2, r.logit_scale_lr, r.epochs) for r in conv] == [(4e-3, None, 1e-4, 192)]
    assert b2 == pytest.approx(0.98)  # at 256 the rule's beta2 is the default: one arm
    long = tf.long_runs(rows, ("emoji",), (1,), batch=256, epochs=192, methods=("clip",), suite_epochs={"emoji": 96})
    assert [(r.lr, r.logit_scale_lr, r.split) for r in long] == [(4e-3, 1e-4, "test")]
    longer = [{**_row("emoji", "clip", 256, 0, q, "val", 4e-3), "epochs": 192, **sl}
              for q, sl in ((0.29, {}), (0.35, {"logit_scale_lr": 1e-4}))]
    table = tf.convergence_table(rows, longer)
    assert "| emoji | clip | 256 | 0.004 | 1e-04 | 0.330 | 0.350 |" in table


def test_epochs_per_dataset_reach_every_run_and_the_lr_choice():
    assert tf.parse_epochs(["converged"], tf.DATASET_NAMES) == tf.CONVERGED_EPOCHS
    assert tf.parse_epochs(["12", "emoji=96"], ("emoji", "fashion")) == {"emoji": 96, "fashion": 12}
    for bad, msg in ((["emoj=3"], "unknown dataset 'emoj'"), (["emoji=96"], "no epochs for fashion"),
                     (["0"], "must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            tf.parse_epochs(bad, ("emoji", "fashion"))
    ep = {"emoji": 96, "fashion": 12}
    runs = tf.lr_runs(("emoji", "fashion"), ("clip",), (16, 256), ep)
    assert {(r.dataset, r.epochs) for r in runs} == {("emoji", 96), ("fashion", 12)}
    assert runs[0].batch == 256  # the cheap runs first
    # an lr search at two budgets: the choice is made among the runs of the asked epochs
    rows = [{**_row("emoji", "clip", 16, 0, q, "val", lr), "epochs": e}
            for e, lr, q in ((12, 1e-3, 0.3), (12, 2e-3, 0.2), (96, 1e-3, 0.4), (96, 2e-3, 0.5))]
    assert tf.chosen_lr(rows, "emoji", "clip", 16, 12) == 1e-3 and tf.chosen_lr(rows, "emoji", "clip", 16, 96) == 2e-3
    test = tf.test_runs(rows, ("emoji",), ("clip",), (16,), (0, 1), ep)
    assert [(r.epochs, r.lr, r.seed) for r in test] == [(96, 2e-3, 0), (96, 2e-3, 1)]


def test_the_report_keeps_the_test_runs_at_each_cells_chosen_lr():
    lr_rows = [{**_row("emoji", "clip", 16, 0, q, "val", lr), "epochs": 96} for lr, q in ((1e-3, 0.3), (5e-4, 0.4))]
    test = [{**_row("emoji", "clip", 16, s, 0.3, "test", lr), "epochs": 96} for s in (1, 2) for lr in (1e-3, 5e-4)]
    test += [{**_row("glyphs", "clip", 16, 1, 0.3), "epochs": 96},  # a cell without an lr search stays
             {**_row("emoji", "amorlip", 16, 1, 0.3, "test", 1e-3), "epochs": 96, "variant": "beta_0"}]
    kept = tf.at_chosen_lr(test, lr_rows)
    assert [(r["dataset"], r["lr"], r["seed"]) for r in kept[:2]] == [("emoji", 5e-4, 1), ("emoji", 5e-4, 2)]
    assert len(kept) == 4


def test_the_test_stage_runs_the_headline_comparison_first():
    runs = [tf.Run(d, m, b, s, "test", epochs=e) for b in (64, 256, 16) for m in ("neuclip", "clip", "amorlip")
            for d, e in (("fashion", 12), ("emoji", 96)) for s in (2, 1)]
    order = sorted(runs, key=tf.test_priority)
    assert [(r.batch, r.method, r.dataset, r.seed) for r in order[:3]] == [
        (16, "amorlip", "emoji", 1), (16, "clip", "emoji", 1), (16, "amorlip", "emoji", 2)]
    assert [r.batch for r in order[::12]] == [16, 256, 64]


def test_beta2_joins_the_search_at_small_batches_and_keeps_the_old_keys():
    """Every method's lr grid runs at the default beta2 and, at B = 16 and 64, at the rule's; runs at the
    default keep the keys they had (their rows are reused), and the choice is over (lr, beta2)."""
    ep = {"emoji": 96}
    runs = tf.lr_runs(("emoji",), ("clip", "dcl"), (16, 64, 256), ep)
    arms = {(r.batch, r.beta2) for r in runs}
    assert arms == {(256, None), (64, None), (64, tf.rule_beta2(64)), (16, None), (16, tf.rule_beta2(16))}
    assert tf.rule_beta2(16) == pytest.approx(0.98 ** (1 / 16)) and len(runs) == 2 * 3 * 5
    plain = tf.Run("emoji", "clip", 16, 0, "val", lr=1e-3, epochs=96)
    assert '"beta2"' not in plain.key() and '"beta2"' in tf.Run("emoji", "clip", 16, 0, "val", lr=1e-3, epochs=96,
                                                                 beta2=0.999).key()
    b2 = tf.rule_beta2(16)
    rows = [{**_row("emoji", "clip", 16, 0, q, "val", lr), "epochs": 96, "beta2": b}
            for lr, b, q in ((1e-3, 0.98, 0.30), (2e-3, 0.98, 0.32), (1e-3, b2, 0.35), (2e-3, b2, 0.31))]
    assert tf.chosen_setting(rows, "emoji", "clip", 16, 96) == (1e-3, b2, None)
    test = tf.test_runs(rows, ("emoji",), ("clip",), (16,), (1,), ep)
    assert [(r.lr, r.beta2) for r in test] == [(1e-3, b2)]
    kept = tf.at_chosen_lr([{**rows[0], "split": "test", "seed": 1}, {**rows[2], "split": "test", "seed": 1}], rows)
    assert [r["beta2"] for r in kept] == [b2]  # the other beta2 at the same lr drops out
    md = tf.markdown_report([{**rows[2], "split": "test"}])
    assert "beta2 (B=16/64/256)" in md and "0.9987" in md


def test_an_optimizer_run_uses_its_beta2(fashion):
    row = tf.train(tf.Run("fashion", "clip", 16, 0, "val", epochs=1, max_steps=1, beta2=0.999), fashion)
    assert row["beta2"] == 0.999


def test_rows_of_a_recipe_since_changed_are_left_out(tmp_path):
    import json

    now = tf.Run("fashion", "neuclip", 16, 0, "val", lr=1e-3, epochs=2)
    old = json.loads(now.key())
    old["recipe"] = {**old["recipe"], "rho": {"name": "constant", "value": 6.5}}  # the recipe as it was
    rows = [{"key": now.key(), "method": "neuclip", "quality": 0.5},
            {"key": json.dumps(old, sort_keys=True), "method": "neuclip", "quality": 0.9},
            {"key": tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=2).key(), "method": "clip"}]
    path = tmp_path / "x.runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = tf.load_rows(path)
    assert sorted(r.get("quality", 0) for r in kept.values()) == [0, 0.5]


@pytest.mark.parametrize("overrides,key", [
    ({"estimator": {"lrr": 0.02}}, "loss.estimator.lrr"),
    ({"rhoo": 6.5}, "loss.rhoo"),
    ({"objective": {"name": "linearized", "pos_weigt": 1.0}}, "loss.objective.pos_weigt"),
])
def test_a_typo_in_a_variant_is_refused_before_any_run_naming_its_key(overrides, key):
    from amortize.options import RecipeError

    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        tf.check_sections([tf.Run("emoji", "amorlip", 16, 0, overrides=overrides)])


def test_every_variant_binds():
    def method(v):  # the method each variant is written for
        if v.startswith("alpha_") or v == "reference_none":
            return "scent"
        return "neuclip" if v.startswith(("robust_", "prototypes_")) else "amorlip"

    tf.check_sections([tf.Run("emoji", method(v), 16, 0, variant=v, overrides=tf.VARIANTS[v]) for v in tf.VARIANTS])


def test_the_keys_of_the_recorded_runs_are_derived_again():
    """A run's key is what finds its row: every current row of the suite's results re-derives it."""
    import json

    n = 0
    for path in sorted(tf.OUT.glob("*.runs.jsonl")):
        if not path.name.startswith(("transfer_", "suite_", "converged_")):
            continue  # the small-batch study's rows (studies.small_batch keys)
        for key in tf.load_rows(path):
            fields = {k: v for k, v in json.loads(key).items() if k != "recipe"}
            assert tf.Run(**fields).key() == key, path.name
            n += 1
    assert n > 500


@pytest.mark.slow
def test_the_scale_probe_is_the_beginning_of_the_whole_run(fashion):
    from studies.scale_probe import probe

    whole = tf.train(tf.Run("fashion", "clip", 16, 0, "val", lr=1e-3, epochs=2), fashion)
    first = probe(("fashion", 0, "clip", 16, 1e-3, None, None, "", 1, 2))
    assert first["scale"] == [round(whole["epochs_log"][0]["scale"], 2)] and first["probe_epochs"] == 1
