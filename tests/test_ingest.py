import gzip
import hashlib
import http.server
import threading
from functools import partial

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.errors import InputDataError
from cellatlas.ingest import canonicalize, download, read_source


def _write_10x_mtx(adata, folder):
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.csr_matrix(adata.X).T.tocoo().astype(np.int64))
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    features = pd.DataFrame({"id": ids, "name": adata.var_names, "type": "Gene Expression"})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


def _write_10x_h5(adata, path):
    m = sp.csc_matrix(adata.X.T.astype(np.int32))  # 10x stores genes x cells, CSC over cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array(adata.obs_names, dtype="S")
        feat = g.create_group("features")
        feat["id"] = np.array([f"ENSG{i:011d}" for i in range(adata.n_vars)], dtype="S")
        feat["name"] = np.array(adata.var_names, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        feat["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
        feat["_all_tag_keys"] = np.array([b"genome"])


@pytest.fixture
def small(sim_counts):
    return sim_counts[:50, :120].copy()


@pytest.mark.parametrize("kind", ["10x_mtx", "10x_h5", "h5ad", "csv", "tsv"])
def test_every_file_source_reads_the_same_counts(kind, small, tmp_path):
    if kind == "10x_mtx":
        path = tmp_path / "mtx"
        _write_10x_mtx(small, path)
    elif kind == "10x_h5":
        path = tmp_path / "x.h5"
        _write_10x_h5(small, path)
    elif kind == "h5ad":
        path = tmp_path / "x.h5ad"
        small.write_h5ad(path)
    else:
        path = tmp_path / f"x.{kind}"
        small.to_df().to_csv(path, sep="\t" if kind == "tsv" else ",")
    source = {"kind": "csv" if kind == "tsv" else kind, "path": str(path)}
    out = canonicalize(read_source("d", source, path=str(path)), "d", path=str(path))
    assert out.shape == small.shape
    assert list(out.var_names) == list(small.var_names)
    assert sp.issparse(out.X) and out.X.format == "csr" and out.X.dtype == np.float32
    np.testing.assert_array_equal(out.X.toarray(), small.X.toarray())


def test_csv_with_genes_as_rows(small, tmp_path):
    path = tmp_path / "x.csv"
    small.to_df().T.to_csv(path)
    out = read_source("d", {"kind": "csv", "path": str(path), "genes_as_rows": True}, path=str(path))
    assert out.shape == small.shape


def test_simulate_and_bundled_sources():
    sim = read_source("s", {"kind": "simulate", "n_cells": 100, "n_genes": 150, "seed": 2})
    assert sim.shape == (100, 150)
    pbmc = canonicalize(
        read_source("p", {"kind": "scanpy", "name": "pbmc68k_reduced"}), "p", matrix="raw", values="lognorm",
        label_key="bulk_labels",
    )
    assert pbmc.n_obs == 700 and pbmc.obs[keys.LABEL].nunique() == 10
    assert not pbmc.obsm  # a precomputed embedding must never leak into the pipeline


def test_standard_columns_copied(canonical):
    for col in (keys.LABEL, keys.BATCH, keys.DONOR):
        assert isinstance(canonical.obs[col].dtype, pd.CategoricalDtype)
    assert canonical.uns[keys.UNS_KEY]["ingest"]["label_key"] == "cell_type"


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_checksum(http_root, small, tmp_path):
    root, base = http_root
    small.write_h5ad(root / "x.h5ad")
    digest = hashlib.sha256((root / "x.h5ad").read_bytes()).hexdigest()
    dest = tmp_path / "dl" / "x.h5ad"
    download(f"{base}/x.h5ad", digest, str(dest), dataset="d")
    assert ad.read_h5ad(dest).shape == small.shape

    wrong = tmp_path / "dl" / "wrong.h5ad"
    with pytest.raises(InputDataError, match="checksum mismatch"):
        download(f"{base}/x.h5ad", "0" * 64, str(wrong), dataset="d")
    assert not wrong.exists() and len(list(wrong.parent.iterdir())) == 1  # no partial file

    with pytest.raises(InputDataError, match="download of .* failed"):
        download(f"{base}/missing.h5ad", digest, str(tmp_path / "dl" / "m.h5ad"), dataset="d")
