"""Result files of evaluated cells, written by hand as evaluation and `rpat perceive` write them (their contract):
eval.json with examples.digest, outcomes.npz, perception.json and perception.npz."""

import hashlib
import json

import numpy as np

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def digest(index) -> str:
    return hashlib.sha256(np.asarray(index, dtype=np.int64).tobytes()).hexdigest()


def write_cell(root, cell, outcomes: dict, *, nonlinearity=None, index=None, perception: dict | None = None):
    """A cell's files under ``root/runs/<cell>``: per-example ``outcomes`` (clean, pgd20, cw, aa: 0/1 arrays),
    accuracies in eval.json computed from them, and, with ``nonlinearity`` (per example), the perception files."""
    n = len(outcomes["clean"])
    index = np.arange(0, 2 * n, 2, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    d = root / "runs" / cell.id
    d.mkdir(parents=True, exist_ok=True)
    acc = {k: 100.0 * float(np.mean(v)) for k, v in outcomes.items()}
    clean, aa = acc["clean"], acc.get("aa")
    ev = {"cell": cell.id, **cell.tags(), "rpat": cell.rpat, "seed": cell.seed, **acc,
          "mean": None if aa is None else (clean + aa) / 2,
          "nrr": None if aa is None else (2 * clean * aa / (clean + aa) if clean + aa else 0.0),
          "n_examples": n, "eps": 0.2, "checkpoint": "best", "selection": {"split": "val"},
          "examples": {"subset": "stratified", "seed": 0, "n": n, "digest": digest(index)},
          "outcomes": "outcomes.npz"}
    (d / "eval.json").write_text(json.dumps(ev))
    np.savez(d / "outcomes.npz", index=index, **{k: np.asarray(v, dtype=bool) for k, v in outcomes.items()})
    if nonlinearity is not None:
        write_perception(d, cell, index, np.asarray(nonlinearity, dtype=np.float64), ev["examples"], perception or {},
                         outcomes.get("pgd20", np.zeros(n, bool)))
    return d


def write_perception(d, cell, index, nl, examples, given: dict, defended_pgd20):
    """perception.json/.npz whose path profile is nl * 4a(1-a) per example (its mean over ALPHAS is nl * 0.5)."""
    shape = np.array([4 * a * (1 - a) for a in ALPHAS])
    path_mse = shape[:, None] * nl[None, :] / shape.mean()  # rescaled: the mean over alphas is nl
    n = len(index)

    def motivation(mse_all, mse_success, mse_failure, acc):
        return {"clean_acc": given.get("clean_acc", 90.0), "perturbed_acc": acc,
                "mse": {"all": mse_all, "success": mse_success, "failure": mse_failure, "n": n,
                        "n_success": round(n * acc / 100), "n_failure": n - round(n * acc / 100)}}

    js = {"cell": cell.id, **cell.coordinates(), "checkpoint": "best", "examples": examples,
          "noise": motivation(*given.get("noise", (0.1, 0.08, 0.3, 85.0))),
          "pgd20": motivation(*given.get("pgd20", (1.0, 0.5, 1.5, 40.0))),
          "path": {"alphas": ALPHAS, "per_alpha": path_mse.mean(axis=1).tolist(), "nonlinearity": float(nl.mean()),
                   "mid_clean": 0.2, "mid_adv": 0.3, "n": n},
          "mlflow_metrics": {"perception_nonlinearity": float(nl.mean())}}
    (d / "perception.json").write_text(json.dumps(js))
    np.savez(d / "perception.npz", index=index, mse_noise=np.full(n, 0.1), defended_noise=np.ones(n, bool),
             mse_pgd20=np.full(n, 1.0), defended_pgd20=np.asarray(defended_pgd20, bool), path_mse=path_mse,
             nonlinearity=nl)


def md_table(path) -> dict[str, dict[str, str]]:
    """The Markdown tables of a report file as {first cell of a row: {column header: cell}} (later rows win)."""
    rows, header = {}, None
    for line in path.read_text().splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Method":
            header = cells
        else:
            rows[cells[0]] = dict(zip(header, cells))
    return rows
