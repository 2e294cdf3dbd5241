"""The Lightning layer: data path, splits, models, determinism, live MLflow, faults."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

from cellatlas import keys
from cellatlas.deep.data import (
    CellDataModule,
    CSRTensors,
    SparseBatches,
    validation_split,
)
from cellatlas.deep.estimator import MLPClassifier
from cellatlas.deep.modules import nb_log_likelihood
from cellatlas.errors import CellAtlasError

FAST = {"threads": 1}


@pytest.fixture(scope="module")
def lognorm():
    import scanpy as sc
    from cellatlas.simulate import simulate_counts

    a = simulate_counts(n_cells=800, n_genes=300, n_types=4, n_donors=6, n_batches=2, seed=11)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return sp.csr_matrix(a.X, dtype=np.float32), a.obs["cell_type"].astype(str).to_numpy(), a.obs["donor"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def counts():
    from cellatlas.ingest import canonicalize
    from cellatlas.simulate import simulate_counts

    a = simulate_counts(n_cells=1200, n_genes=300, n_types=4, n_donors=6, n_batches=2, batch_sd=0.3, seed=12)
    a = canonicalize(a, "sim", label_key="cell_type", batch_key="batch", donor_key="donor")
    a.layers[keys.COUNTS_LAYER] = a.X.copy()
    return a


def test_rows_gathered_in_bulk_equal_scipy_rows():
    rng = np.random.default_rng(0)
    X = sp.random(200, 50, density=0.1, format="csr", random_state=1, dtype=np.float32)
    X[5] = 0  # an empty row
    X.eliminate_zeros()
    rows = rng.choice(200, size=64)  # with repeats
    rows[:2] = [5, 199]
    got = CSRTensors.from_scipy(X).rows(torch.as_tensor(rows)).numpy()
    np.testing.assert_array_equal(got, X[rows].toarray())
    empty = sp.csr_matrix((3, 4), dtype=np.float32)
    assert CSRTensors.from_scipy(empty).rows(torch.tensor([0, 2])).abs().sum() == 0


def test_batches_cover_every_row_once_per_epoch_in_a_seeded_order():
    X = CSRTensors.from_scipy(sp.eye(103, format="csr", dtype=np.float32))
    rows = np.arange(3, 103)

    def epochs(seed, n=2):
        b = SparseBatches(X, rows, y=np.arange(103), batch_size=16, shuffle=True, seed=seed)
        return [np.concatenate([y.numpy() for _, y, _ in b]) for _ in range(n)]

    e1, e2 = epochs(0), epochs(0)
    assert sorted(e1[0]) == list(rows) and sorted(e1[1]) == list(rows)
    assert not np.array_equal(e1[0], e1[1])  # reshuffled each epoch
    assert all(np.array_equal(a, b) for a, b in zip(e1, e2))  # same seed, same order
    assert not np.array_equal(e1[0], epochs(1)[0])
    for x, y, _ in SparseBatches(X, rows, y=np.arange(103), batch_size=16):
        assert np.array_equal(x.numpy().argmax(1), y.numpy())  # each row's features travel with its label
    # data parallel: equal shares that together cover every row
    shares = [SparseBatches(X, rows, y=np.arange(103), batch_size=16, shuffle=True, rank=r, world_size=3) for r in range(3)]
    seen = [np.concatenate([y.numpy() for _, y, _ in s]) for s in shares]
    assert len({len(s) for s in seen}) == 1 and len({len(s) for s in shares}) == 1
    assert set(np.concatenate(seen)) == set(rows)


def test_a_last_batch_of_one_cell_joins_the_one_before(lognorm):
    """BatchNorm cannot train on one cell; the batch count must still match what is yielded
    (Lightning runs validation on the batch it believes is the last)."""
    X, y, _ = lognorm
    b = SparseBatches(CSRTensors.from_scipy(X[:53]), np.arange(53), batch_size=26, shuffle=True)
    sizes = [x.shape[0] for x, _, _ in b]
    assert sizes == [26, 27] and len(b) == 2
    fitted = MLPClassifier(batch_size=26, max_epochs=2, val_fraction=0.1, trainer=FAST).fit(X[:30], y[:30])
    assert len(fitted.history_) == 2 and "val_loss" in fitted.history_[0]  # 27 training cells: 26 + 1


def test_validation_holds_out_whole_donors_when_there_are_enough():
    y = np.repeat(["a", "b"], 100)
    groups = np.tile(np.arange(20), 10).astype(str)
    fit, val, how = validation_split(200, y=y, groups=groups, fraction=0.1, seed=0)
    assert how == "grouped" and not set(groups[fit]) & set(groups[val])
    assert len(fit) + len(val) == 200 and 0 < len(val) < 60
    fit, val, how = validation_split(200, y=y, groups=np.repeat(["d1", "d2"], 100), fraction=0.1, seed=0)
    assert how == "stratified" and set(y[val]) == {"a", "b"} and len(val) == 20


def test_nb_log_likelihood_matches_scipy():
    from scipy.stats import nbinom

    x = torch.tensor([0.0, 1.0, 5.0, 30.0])
    mu = torch.tensor([0.5, 2.0, 4.0, 25.0])
    theta = torch.tensor([1.0, 3.0, 0.5, 10.0])
    p = theta / (theta + mu)
    expected = nbinom.logpmf(x.numpy(), theta.numpy(), p.numpy())
    np.testing.assert_allclose(nb_log_likelihood(x, mu, theta).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_mlp_learns_and_same_seed_gives_identical_numbers(lognorm):
    X, y, donors = lognorm
    train, test = np.arange(600), np.arange(600, 800)
    fits = [MLPClassifier(max_epochs=8, random_state=s, trainer=FAST).fit(X[train], y[train], groups=donors[train])
            for s in (0, 0, 1)]
    accuracy = (fits[0].predict(X[test]) == y[test]).mean()
    assert accuracy > 0.9, accuracy
    p0, p1, p2 = (f.predict_proba(X[test]) for f in fits)
    np.testing.assert_array_equal(p0, p1)
    pd.testing.assert_frame_equal(pd.DataFrame(fits[0].history_).drop(columns="seconds"),
                                  pd.DataFrame(fits[1].history_).drop(columns="seconds"))
    assert not np.array_equal(p0, p2)  # the seed matters
    assert np.allclose(p0.sum(axis=1), 1) and list(fits[0].classes_) == sorted(set(y))
    h = pd.DataFrame(fits[0].history_)
    assert {"train_loss", "val_loss", "val_macro_f1", "val_accuracy"} <= set(h.columns)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]


def test_mlp_early_stopping_keeps_the_best_epoch(lognorm):
    X, y, donors = lognorm
    m = MLPClassifier(max_epochs=60, patience=2, lr=3e-3, trainer=FAST).fit(X, y, groups=donors)
    h = pd.DataFrame(m.history_)
    assert m.fit_summary_["stopped_early"] == 1.0 and len(h) < 60
    assert m.fit_summary_["best_epoch"] == int(h["val_loss"].idxmin())
    assert m.fit_summary_["best_val_loss"] == pytest.approx(h["val_loss"].min())


@pytest.mark.parametrize("plan", ["classifier", "vae"])
def test_nan_validation_loss_stops_the_fold_with_the_same_message(plan):
    import torch
    from cellatlas.deep.plans import ClassifierPlan, NonFiniteLossError, VAEPlan

    x = torch.full((4, 5), float("nan"))
    if plan == "classifier":
        p, batch = ClassifierPlan(n_genes=5, n_classes=2), (x, torch.tensor([0, 1, 0, 1]), torch.empty(0))
    else:
        p, batch = VAEPlan(n_genes=5, n_latent=2), (x, torch.empty(0), torch.empty(0))
    with pytest.raises(NonFiniteLossError, match=r"^validation loss became nan at epoch 0, batch 3 .*lower 'lr'"):
        p.validation_step(batch, 3)


def test_a_fit_never_resumes_from_an_old_checkpoint(lognorm, tmp_path):
    """A stale checkpoint of other parameters at the output path is replaced, not resumed."""
    from cellatlas.deep.plans import ClassifierPlan

    X, y, _ = lognorm
    ckpt = tmp_path / "model.ckpt"
    MLPClassifier(max_epochs=3, hidden=[16], trainer=FAST).fit(X, y, checkpoint=str(ckpt))
    assert ClassifierPlan.load_from_checkpoint(ckpt).hparams.hidden == (16,)
    m = MLPClassifier(max_epochs=2, hidden=[32, 8], trainer=FAST).fit(X, y, checkpoint=str(ckpt))
    assert [r["epoch"] for r in m.history_] == [0, 1]  # started at epoch 0
    back = ClassifierPlan.load_from_checkpoint(ckpt)
    assert back.hparams.hidden == (32, 8)
    probs = torch.softmax(back.eval()(torch.from_numpy(X[:5].toarray())), 1).detach().numpy()
    np.testing.assert_allclose(probs, m.predict_proba(X[:5]), atol=1e-5)


def test_datamodule_builds_batches_on_the_cpu_without_a_trainer(lognorm):
    X, y, donors = lognorm
    dm = CellDataModule(X, y=np.unique(y, return_inverse=True)[1], groups=donors, batch_size=100, val_fraction=0.2)
    dm.setup("fit")
    assert dm.device.type == "cpu" and len(dm.fit_rows) + len(dm.val_rows) == X.shape[0]
    x, yb, c = next(iter(dm.train_dataloader()))
    assert x.shape == (100, X.shape[1]) and yb.shape == (100,) and c.numel() == 0


def test_epochs_reach_the_stage_run_live_and_leave_it_running(lognorm, tmp_path):
    from mlflow.tracking import MlflowClient

    X, y, donors = lognorm
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp)
    MLPClassifier(max_epochs=4, trainer=FAST, tracking={"uri": uri, "run_id": run.info.run_id}).fit(
        X, y, groups=donors, log_prefix="fold_0")
    history = client.get_metric_history(run.info.run_id, "fold_0/val_loss")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    assert len(steps) == 4 and steps == sorted(steps)  # one value per epoch, at the epoch's last step
    assert client.get_metric_history(run.info.run_id, "fold_0/val_macro_f1")
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # the stage closes its own run


def test_vae_embeds_counts_and_recovers_types(counts):
    from cellatlas.deep.embedding import LATENT, UMAP, cluster_embedding, train_vae
    from sklearn.metrics import adjusted_rand_score

    model = {"n_latent": 8, "hidden": 64, "n_layers": 1, "dropout": 0.1, "lr": 3e-3, "weight_decay": 1e-6,
             "kl_warmup_epochs": 3, "max_epochs": 60, "patience": 10, "batch_size": 128, "val_fraction": 0.1,
             "batch_correct": True}
    a, b = counts.copy(), counts.copy()
    ra = train_vae(a, dataset="sim", model=model, trainer=FAST, seed=0)
    train_vae(b, dataset="sim", model=model, trainer=FAST, seed=0)
    assert a.obsm[LATENT].shape == (a.n_obs, 8)
    np.testing.assert_array_equal(a.obsm[LATENT], b.obsm[LATENT])  # same seed, same embedding
    h = pd.DataFrame(ra.history)
    assert h["val_loss"].min() < h["val_loss"].iloc[0]
    assert ra.plan.hparams.n_batches == 2 and len(ra.plan.hparams.batches) == 2
    # the best of two resolutions: torch's CPU kernels differ between
    # processors, and on an AMD EPYC r = 0.1 splits the largest type in two (ARI 0.69; r = 0.05: 1.0)
    table, mixing = cluster_embedding(a, n_neighbors=15, resolutions=[0.05, 0.1], umap_min_dist=0.5)
    assert a.obsm[UMAP].shape == (a.n_obs, 2) and "vae_leiden_r0.1" in a.obs
    assert table["ari_vae"].max() > 0.8, table
    assert adjusted_rand_score(a.obs[keys.LABEL], a.obs["vae_leiden_r0.1"]) == pytest.approx(table.loc[1, "ari_vae"])
    # without the batch in encoder and decoder, the strong batch effect splits every type in two
    c = counts.copy()
    train_vae(c, dataset="sim", model={**model, "batch_correct": False}, trainer=FAST, seed=0)
    plain, plain_mixing = cluster_embedding(c, n_neighbors=15, resolutions=[0.05, 0.1], umap_min_dist=0.5)
    assert plain["ari_vae"].max() < table["ari_vae"].max() - 0.3, (plain, table)
    # and the batch mixing of the kNN graph says so (measured 0.0005 and 0.22: within a type the
    # batches still sit apart locally; this fixture has no PCA graph to compare)
    assert set(mixing) == {"batch_mixing"}
    assert plain_mixing["batch_mixing"] < 0.02 and mixing["batch_mixing"] > 0.1, (plain_mixing, mixing)


def test_vae_keys_left_out_take_the_schemas_defaults(counts):
    from cellatlas.config import schema_defaults
    from cellatlas.deep.embedding import LATENT, train_vae

    defaults = schema_defaults("train", "embedding")
    a = counts.copy()
    result = train_vae(a, dataset="sim", model={"max_epochs": 1}, trainer=FAST, seed=0)
    hp = result.plan.hparams
    assert a.obsm[LATENT].shape[1] == hp.n_latent == defaults["n_latent"]
    assert (hp.kl_weight, hp.encoder_input, hp.hidden) == (defaults["kl_weight"], defaults["encoder_input"], defaults["hidden"])
    assert result.epochs == 1


def test_vae_genes_are_the_hvgs_or_chosen_by_pearson_residuals(counts, tmp_path):
    import anndata as ad
    import scanpy as sc
    from sklearn.feature_selection import f_classif

    from cellatlas.deep.embedding import load_vae, training_matrix, train_vae

    a = counts.copy()
    a.var["highly_variable"] = np.arange(a.n_vars) < 100
    X, genes = training_matrix(a, dataset="sim")
    assert X.shape == (a.n_obs, 100) and genes == list(a.var_names[:100])
    X, genes = training_matrix(a, dataset="sim", genes="pearson_residuals")
    assert X.shape == (a.n_obs, 100) and genes != list(a.var_names[:100])
    # scanpy's own selection, per batch, on the counts
    ref = ad.AnnData(a.layers[keys.COUNTS_LAYER].astype(np.float32), obs=a.obs[[keys.BATCH]].astype(str))
    sc.experimental.pp.highly_variable_genes(ref, flavor="pearson_residuals", n_top_genes=100, batch_key=keys.BATCH)
    assert set(genes) == set(a.var_names[ref.var["highly_variable"].to_numpy()])
    # they are the genes that tell the types apart
    f, _ = f_classif(a.layers[keys.COUNTS_LAYER].toarray(), a.obs[keys.LABEL].astype(str))
    assert np.nanmean(f[a.var_names.isin(genes)]) > 2 * np.nanmean(f)
    # the config key reaches the model: its checkpoint names the genes it reads
    model = {"n_latent": 4, "hidden": 32, "n_layers": 1, "dropout": 0.0, "lr": 1e-3, "weight_decay": 0.0,
             "kl_warmup_epochs": 0, "max_epochs": 1, "patience": 2, "batch_size": 256, "val_fraction": 0.1,
             "genes": "pearson_residuals"}
    train_vae(a, dataset="sim", model=model, trainer=FAST, checkpoint=str(tmp_path / "vae.ckpt"))
    assert list(load_vae(tmp_path / "vae.ckpt").hparams.genes) == genes


def test_vae_checkpoint_carries_genes_and_encodes_a_new_batch(counts, tmp_path):
    from cellatlas.deep.embedding import load_vae, train_vae

    model = {"n_latent": 4, "hidden": 32, "n_layers": 1, "dropout": 0.0, "lr": 1e-3, "weight_decay": 0.0,
             "kl_warmup_epochs": 0, "max_epochs": 2, "patience": 2, "batch_size": 256, "val_fraction": 0.1,
             "batch_correct": True}
    a = counts.copy()
    train_vae(a, dataset="sim", model=model, trainer=FAST, checkpoint=str(tmp_path / "vae.ckpt"))
    plan = load_vae(tmp_path / "vae.ckpt")
    assert len(plan.hparams.genes) == 300 and plan.hparams.n_batches == 2
    x = torch.from_numpy(a.layers[keys.COUNTS_LAYER][:6].toarray().astype(np.float32))
    seen, _ = plan.net.encode(x, torch.zeros(6, dtype=torch.long))
    unseen, _ = plan.net.encode(x, torch.full((6,), 7))  # a batch the model never saw: no batch vector
    assert seen.shape == unseen.shape == (6, 4) and torch.isfinite(unseen).all()


def test_data_parallel_launch_inside_a_single_task_slurm_job(monkeypatch):
    """Lightning believes SLURM's task count; a Snakemake job is one task, so for two devices the
    fit must start its own processes and not take SLURM's environment."""
    from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

    from cellatlas.deep.training import TrainerSettings, launch_plan

    for var in [v for v in __import__("os").environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    assert launch_plan(TrainerSettings(devices=1)) == ("auto", [], 1)
    assert launch_plan(TrainerSettings(accelerator="cpu", devices="0,1"))[2] == 2
    assert launch_plan(TrainerSettings(accelerator="cpu", devices=2)) == ("ddp_spawn", [], 2)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "rule_train_vae")
    strategy, plugins, n = launch_plan(TrainerSettings(accelerator="cpu", devices=2))
    assert (strategy, n) == ("ddp_spawn", 2) and len(plugins) == 1 and isinstance(plugins[0], LightningEnvironment)
    # launched by srun with one task per device: SLURM's own environment is right (never requeueing:
    # Snakemake retries jobs), and so it is for one device
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    # a whole pipeline inside `sbatch --ntasks=2` without srun: still one process, so spawn
    assert launch_plan(TrainerSettings(accelerator="cpu", devices=2))[0] == "ddp_spawn"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    strategy, plugins, n = launch_plan(TrainerSettings(accelerator="cpu", devices=2, strategy="ddp"))
    assert (strategy, n) == ("ddp", 2) and isinstance(plugins[0], SLURMEnvironment) and not plugins[0].auto_requeue
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    assert isinstance(launch_plan(TrainerSettings(devices=1))[1][0], SLURMEnvironment)
    # an explicit strategy is kept
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    assert launch_plan(TrainerSettings(accelerator="cpu", devices=2, strategy="ddp_fork"))[0] == "ddp_fork"


def _two_process_fit(tmp_path, body: str) -> dict:
    """Run ``body`` (indented for ``main``) in a fresh interpreter, where ``m`` is a small MLP set
    to fit ``X``, ``y`` on two spawned CPU processes; its last stdout line is JSON."""
    import json
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT

    script = tmp_path / "fit2.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "workflow" / "scripts")!r})
        import numpy as np, scipy.sparse as sp
        from cellatlas.deep.estimator import MLPClassifier

        def main():
            rng = np.random.default_rng(0)
            y = rng.integers(0, 3, 600)
            X = sp.csr_matrix((rng.poisson(1.0, (600, 30)) + 20 * np.eye(3)[y].repeat(10, 1)).astype(np.float32))
            m = MLPClassifier(hidden=(16,), max_epochs=4, patience=10, n_jobs=1, lr=0.01,
                              trainer={{"accelerator": "cpu", "devices": 2}})
    """) + textwrap.indent(textwrap.dedent(body), " " * 4) + textwrap.dedent("""
        if __name__ == "__main__":
            main()
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_process_fit_hands_back_its_history_and_best_epoch(tmp_path):
    """A real two-process fit (spawned workers on the CPU): the calling process gets the best
    epoch's weights, the whole history and the number of processes."""
    out = _two_process_fit(tmp_path, """
        m.fit(X, y)
        print(json.dumps({**m.fit_summary_, "history": len(m.history_), "acc": float((m.predict(X) == y.astype(str)).mean())}))
    """)
    assert out["processes"] == 2 and out["epochs"] == 4 and out["history"] == 4
    assert out["best_val_loss"] > 0 and 0 <= out["best_epoch"] < 4
    assert out["acc"] > 0.5


def test_worker_error_reads_the_pipeline_error_out_of_a_worker_traceback():
    from torch.multiprocessing import ProcessRaisedException

    from cellatlas.deep.plans import NonFiniteLossError
    from cellatlas.deep.training import worker_error

    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
            '  File "plans.py", line 30, in _check_finite\n    raise NonFiniteLossError(\n'
            "cellatlas.deep.plans.NonFiniteLossError: training loss became nan at epoch 0, batch 2 (learning rate 0.01)\n")
    e = worker_error(ProcessRaisedException(text, 1, 123))
    assert type(e) is NonFiniteLossError and str(e) == "training loss became nan at epoch 0, batch 2 (learning rate 0.01)"
    other = worker_error(ProcessRaisedException(text.replace("deep.plans.NonFiniteLossError", "errors.ConfigError"), 1, 1))
    assert type(other) is CellAtlasError and str(other).startswith("training loss")
    # anything else stays what it was
    assert worker_error(ProcessRaisedException("RuntimeError: gloo: connection closed by peer", 0, 1)) is None
    assert worker_error(ValueError("cellatlas.errors.ConfigError: x")) is None


def test_nan_loss_in_a_spawned_worker_is_the_same_one_line_error(tmp_path):
    """Two processes on the CPU: a NaN loss in a worker reaches the caller as NonFiniteLossError
    with its own message, not as torch's multiprocessing traceback."""
    out = _two_process_fit(tmp_path, """
        from cellatlas.deep.plans import NonFiniteLossError

        X.data[::7] = np.nan  # in every process's share of the cells
        try:
            m.fit(X, y)
        except NonFiniteLossError as e:
            print(json.dumps({"error": str(e)}))
    """)
    assert "\n" not in out["error"]
    assert out["error"].startswith("training loss became nan at epoch 0, batch ") and out["error"].endswith("check the input values")
