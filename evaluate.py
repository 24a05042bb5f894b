"""Evaluate trained probes on held-out test studies: every number in a JSON, a readable
table, and PNG plots (SPEC section 4).

    python evaluate.py --probes=out/probe_ct/probe.pt --labels=out/shards/labels.csv --out=out/eval
    python evaluate.py --probes=out/p_jepa/probe.pt,out/p_random/probe.pt,out/p_mean/probe.pt \
        --names=pretrained,random_init,mean_pool --labels=... --shards=out/shards --cohort=out/demo

Per probe: per-class AUROC, sensitivity, specificity, balanced accuracy at the thresholds
chosen on validation, 95% CIs from a study-level bootstrap (`n_boot` replicates), macro
averages over defined classes (classes with no test positives are listed as undefined),
Platt-calibrated F1 and the label-efficiency OLS fit (F1 vs log10 training positives); for
age probes MAE and RMSE. The first probe may also be grounded (`cohort`: pointing game
against the demo lesion masks, NIfTI attention overlays) and flip-tested (`flip_test`:
re-encodes the test volumes mirrored left-right with the probe's encoder, `shards` needed).
`reports`: a generated-reports JSONL scored by nvfm.report_metrics.evaluate_reports.

Outputs in `out`: metrics.json, table.txt, roc_<probe>.png, label_efficiency_<probe>.png,
grounding/*.nii.gz.
"""
import json
import os

import numpy as np
import torch

# -----------------------------------------------------------------------------
probes = ""            # comma-separated probe.pt paths (train_probe.py --out)
names = ""             # comma-separated display names ("" = parent folder names)
labels = ""            # SHARDS/labels.csv
findings = ""          # SHARDS/findings.jsonl ("" -> beside labels)
features = ""          # override the feature cache recorded in the probe ("" = recorded)
split = "test"         # evaluated split (ignored for CV probes: their held-out test keys)
out = "out/eval"
n_boot = 10000
seed = 0
shards = ""            # SHARDS directory: needed for grounding overlays and the flip test
cohort = ""            # demo cohort root (lesion masks gt/...): pointing game
flip_test = False      # re-encode flipped test volumes (needs shards and the encoder)
flip_split = ""        # splits for the flip test, e.g. "val,test" ("" = the evaluated studies)
anatomy = False        # patch matching + k-means brain IoU of the first probe's features (needs shards, cohort)
encoder = ""           # encoder for the flip test ("" = the one recorded in the feature cache)
overlays = 3           # write NIfTI attention overlays for this many positive test studies
reports = ""           # generated reports JSONL -> nvfm.report_metrics.evaluate_reports
plots = True
device = "cuda" if torch.cuda.is_available() else "cpu"
threads = 0            # CPU threads (0 = PyTorch default; 1-2 is fastest for small probes)
# -----------------------------------------------------------------------------
from nvfm.configurator import configure  # noqa: E402
configure(globals())
if threads > 0:
    torch.set_num_threads(threads)

from nvfm import metrics  # noqa: E402
from nvfm import probe as P  # noqa: E402
from nvfm.checkpoint import load_checkpoint, load_state_strict  # noqa: E402
from nvfm.features import FeatureCache  # noqa: E402


def load_probe(path):
    """-> (checkpoint dict, list of probe modules in eval mode)."""
    ck = load_checkpoint(path)
    models = []
    for i, st in enumerate(ck["models"]):
        m = P.make_probe(**ck["probe_args"])
        load_state_strict(m, st, f"{path} model {i}")
        models.append(m.to(device).eval())
    return ck, models


def evaluate_probe(path, display, rows_by_key, sides):
    ck, models = load_probe(path)
    cache = FeatureCache(features or ck["features"], expect_hash=ck["encoder_hash"])
    wins = set(ck["windows"].split(",")) if ck["windows"] else None
    lab = ck["label_names"]
    mod = ck["eval_modality"]
    if "test_keys" in ck:
        keys = list(ck["test_keys"])
    else:
        keys = [k for k, r in rows_by_key.items() if r["split"] == split and (mod == "all" or r["modality"] == mod)]
    if ck["task"] == "age":
        keys = [k for k in keys if rows_by_key[k]["age"] is not None]
    missing = [k for k in keys if k not in cache]
    if missing:
        raise SystemExit(f"evaluate.py: {len(missing)} {split} studies are not in the feature cache {cache.path} "
                         f"(first: {missing[:3]}); run encode.py on the {split} split")
    unknown = [n for n in lab if n not in P.SIDE_CLASSES and n != "age" and
               n not in next(iter(rows_by_key.values()))["y"]]
    if unknown:
        raise SystemExit(f"evaluate.py: probe label names {unknown[:5]} are not columns of {labels}")
    if not keys:
        raise SystemExit(f"evaluate.py: no {mod} studies in split {split!r}")

    def get_bag(key):
        return torch.from_numpy(np.asarray(cache.study_tokens(key, wins)[0], dtype=np.float32))

    logits = P.predict(models, get_bag, keys, device)
    res = {"probe": path, "kind": ck["probe_args"]["kind"], "task": ck["task"], "protocol": ck["protocol"],
           "modality": ck["modality"], "eval_modality": mod, "n_models": len(models), "n_studies": len(keys),
           "encoder_hash": ck["encoder_hash"]}
    if ck["task"] == "age":
        pred = logits[:, 0] * ck["age_sd"] + ck["age_mu"]
        age = np.array([rows_by_key[k]["age"] for k in keys])
        res.update(mae=metrics.mae(age, pred), rmse=metrics.rmse(age, pred))
        return res, None
    y = np.array([[(int(n.split("_")[1] in sides.get(k, ())) if n in P.SIDE_CLASSES else rows_by_key[k]["y"][n])
                   for n in lab] for k in keys], dtype=np.float64)
    thr = np.array(ck["thresholds"])
    rep = metrics.classification_report(y, logits, thr, lab, n_boot=n_boot, seed=seed, device=device,
                                        progress=n_boot >= 1000)
    prob = metrics.platt_apply(logits, np.array(ck["platt_a"]), np.array(ck["platt_b"]))
    cf1 = metrics.f1(y, prob >= 0.5)
    for k, n in enumerate(lab):
        rep["per_class"][n]["calibrated_f1"] = metrics.jsonable(cf1[k])
        rep["per_class"][n]["n_train_pos"] = ck["n_train_pos"][k]
    rep["macro"]["calibrated_f1"] = dict(zip(("mean", "n_classes"), metrics.macro(cf1)))
    rep["label_efficiency"] = metrics.label_efficiency_fit(ck["n_train_pos"], cf1)
    res.update(rep)
    return res, dict(keys=keys, y=y, logits=logits, ck=ck, models=models, cache=cache, wins=wins, display=display)


def fmt(v, nd=3):
    return "undefined" if v is None else f"{v:.{nd}f}"


def table(res):
    lines = [f"== {res['display']}  ({res['kind']}, {res['protocol']}, {res['modality']} -> {res['eval_modality']}, "
             f"{res['n_studies']} studies, {res['n_models']} model(s))"]
    if res["task"] == "age":
        lines.append(f"   age: MAE {res['mae']:.2f} years, RMSE {res['rmse']:.2f} years")
        return "\n".join(lines)
    lines.append(f"   {'class':<38} {'pos':>4} {'AUROC [95% CI]':>24} {'sens':>6} {'spec':>6} {'bacc':>6} {'F1cal':>6}")
    for n, r in res["per_class"].items():
        if r["n_pos"] == 0 and r["n_train_pos"] == 0:
            continue  # absent everywhere: listed in the JSON only
        ci = r.get("auroc_ci") or [None, None]
        au = f"{fmt(r['auroc'])} [{fmt(ci[0])}, {fmt(ci[1])}]" if r["auroc"] is not None else "undefined"
        lines.append(f"   {n[:38]:<38} {r['n_pos']:>4} {au:>24} {fmt(r['sensitivity'], 2):>6} "
                     f"{fmt(r['specificity'], 2):>6} {fmt(r['balanced_accuracy'], 2):>6} {fmt(r['calibrated_f1'], 2):>6}")
    m = res["macro"]
    ci = m["auroc"].get("ci", [None, None])
    lines.append(f"   macro AUROC {fmt(m['auroc']['mean'])} [{fmt(ci[0])}, {fmt(ci[1])}] over {m['auroc']['n_classes']} "
                 f"defined classes; balanced accuracy {fmt(m['balanced_accuracy']['mean'])}; "
                 f"calibrated F1 {fmt(m['calibrated_f1']['mean'])}; {len(res['undefined_classes'])} undefined classes")
    le = res["label_efficiency"]
    if le["slope"] is not None:
        lines.append(f"   label efficiency: F1 = {le['intercept']:.3f} + {le['slope']:.3f} log10(train positives), "
                     f"R^2 {fmt(le['r2'])}, {le['n']} classes")
    return "\n".join(lines)


def plot(res, data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    tag = res["display"]
    y, lg, lab = data["y"], data["logits"], data["ck"]["label_names"]
    fig, ax = plt.subplots(figsize=(6, 6))
    order = sorted([k for k in range(len(lab)) if res["per_class"][lab[k]]["auroc"] is not None],
                   key=lambda k: -y[:, k].sum())[:12]
    for k in order:
        fpr, tpr, _ = roc_curve(y[:, k], lg[:, k])
        ax.plot(fpr, tpr, lw=1.2, label=f"{lab[k][:28]} ({res['per_class'][lab[k]]['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity",
           title=f"{tag}: ROC (macro AUROC {fmt(res['macro']['auroc']['mean'])})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"roc_{tag}.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    npos = np.array(data["ck"]["n_train_pos"])
    f1s = np.array([np.nan if res["per_class"][n]["calibrated_f1"] is None else res["per_class"][n]["calibrated_f1"]
                    for n in lab])
    ok = (npos > 0) & np.isfinite(f1s)
    ax.scatter(np.log10(npos[ok]), f1s[ok], s=14)
    le = res["label_efficiency"]
    if le["slope"] is not None:
        xs = np.linspace(np.log10(npos[ok]).min(), np.log10(npos[ok]).max(), 10)
        ax.plot(xs, le["intercept"] + le["slope"] * xs, "r-", label=f"OLS slope {le['slope']:.3f}")
        ax.legend()
    ax.set(xlabel="log10(training positives)", ylabel="Platt-calibrated F1", title=f"{tag}: label efficiency")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"label_efficiency_{tag}.png"), dpi=110)
    plt.close(fig)


def main():
    if not (probes and labels) and not reports:
        raise SystemExit("evaluate.py: --probes and --labels are required (or --reports with --findings)")
    if reports and not (findings or labels):
        raise SystemExit("evaluate.py: --reports needs --findings (SHARDS/findings.jsonl)")
    os.makedirs(out, exist_ok=True)
    paths = [p for p in probes.split(",") if p]
    disp = names.split(",") if names else [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(disp) != len(paths):
        raise SystemExit(f"evaluate.py: {len(disp)} names for {len(paths)} probes")
    rows, _ = P.load_labels(labels) if paths else ([], [])
    rows_by_key = {r["study_key"]: r for r in rows}
    fpath = findings or os.path.join(os.path.dirname(labels), "findings.jsonl")
    sides = P.load_sides(fpath) if os.path.exists(fpath) else {}
    results, first = {}, None
    for p, d in zip(paths, disp):
        res, data = evaluate_probe(p, d, rows_by_key, sides)
        res["display"] = d
        results[d] = res
        if data is not None and first is None:
            first = data
        if plots and data is not None:
            plot(res, data)
        print(table(res), flush=True)
    summary = {"macro_auroc": {d: r.get("macro", {}).get("auroc", {}).get("mean") for d, r in results.items()}}
    if first is not None and (cohort or flip_test or anatomy):
        from nvfm import grounding
        if not shards:
            raise SystemExit("evaluate.py: grounding and the flip test need --shards")
        from nvfm.data import ShardReader
        reader = ShardReader(shards)
        if cohort:
            g = grounding.pointing_game_eval(first, reader, cohort, findings_path=fpath, device=device,
                                             overlay_dir=os.path.join(out, "grounding"), n_overlays=overlays)
            summary["pointing_game"] = g["accuracy"]
            results[first["display"]]["grounding"] = g
            print(f"pointing game ({first['display']}): {fmt(g['accuracy'])} over {g['n']} lesions "
                  f"(chance {fmt(g['chance'])}); overlays in {os.path.join(out, 'grounding')}")
        if flip_test:
            fk = None
            if flip_split:
                mod = first["ck"]["eval_modality"]
                fk = [k for k, r in rows_by_key.items() if r["split"] in flip_split.split(",")
                      and (mod == "all" or r["modality"] == mod)]
            f = grounding.flip_test_eval(first, reader, sides, keys=fk, encoder_spec=encoder, device=device)
            summary["flip_test_auroc"] = f["auroc"]
            results[first["display"]]["flip_test"] = f
            if "note" in f:
                print(f"flip test ({first['display']}): not run: {f['note']}")
            else:
                print(f"flip test ({first['display']}): AUROC {fmt(f['auroc'])} over {f['n']} unilateral studies "
                      f"({f['n_left']} left; dL AUROC {fmt(f['auroc_dL'])}, dR AUROC {fmt(f['auroc_dR'])})")
        if anatomy:
            from nvfm import anatomy as A
            nm = {k: r.get("study") or "" for k, r in rows_by_key.items()}
            a = A.anatomy_eval(first["cache"], reader, cohort, first["keys"], nm, seed=seed)
            summary["anatomy"] = a
            results[first["display"]]["anatomy"] = a
            pm, km = a["patch_matching"], a["kmeans_brain"]
            print(f"anatomy ({first['display']}): patch matching median error {fmt(pm['median_mm'], 1)} mm "
                  f"(chance {fmt(pm['chance_median_mm'], 1)}) over {pm['n_pairs']} volume pairs; k-means(3) brain "
                  f"IoU {fmt(km['iou'])} (chance {fmt(km['chance_iou'])}) over {km['n_volumes']} volumes")
    if reports:
        from nvfm import report_metrics  # the report generator's metrics; imported only when asked
        results["reports"] = report_metrics.evaluate_reports(reports, fpath)
        summary["reports"] = results["reports"]
    print("summary: " + json.dumps(metrics.jsonable(summary)))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics.jsonable({"summary": summary, "results": results}), f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write("\n\n".join(table(r) for k, r in results.items() if k != "reports") + "\n")
    print(f"wrote {out}/metrics.json, table.txt" + (", PNG plots" if plots else ""))


if __name__ == "__main__":
    main()
