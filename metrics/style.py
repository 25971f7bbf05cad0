"""The style classifier of "Text-Guided Synthesis of Artistic Images with Retrieval-Augmented Diffusion
Models": a two-layer perceptron on CLIP image features, trained on a labelled art collection (ArtBench
styles in the paper, 77 % top-1 on its validation set), used to score generated images per style.

Training features come from the pack's style database of the collection when one is given (its L2-normalised
CLIP rows), else from the images of a WikiArt/ArtBench-layout folder (``Style/artist_title.jpg``, names parsed
by ``common.artdata``), embedded once and cached. The classifier is saved as safetensors with its labels and
the embedder (architecture, weights hash, dim) in the header; scoring with another CLIP is refused.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..common.artdata import load_metadata_table, row_metadata
from ..common.files import atomic_write
from ..common.progress import NO_PROGRESS
from .features import ClipImageFeatures, folder_features
from .frechet import MetricsError

FORMAT = "atelier-style-classifier"
FORMAT_VERSION = 1
LABEL_FIELDS = ("style", "artist", "genre")


def norm_label(text):
    return " ".join(str(text or "").lower().replace("_", " ").replace("-", " ").split())


def _mlp(dim, hidden, classes, dropout=0.1):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(hidden, classes))


class StyleClassifier:
    """A trained classifier: ``labels``, ``embedder`` {name, weights_hash, dim}, ``hidden``, ``info``."""

    def __init__(self, module, labels, embedder, hidden, info=None):
        self.module, self.labels, self.embedder, self.hidden = module.eval(), list(labels), dict(embedder), int(hidden)
        self.info = dict(info or {})

    @property
    def dim(self):
        return int(self.embedder["dim"])

    def __repr__(self):
        return (f"StyleClassifier({len(self.labels)} labels, open_clip {self.embedder['name']}/"
                f"{self.embedder['weights_hash']}, hidden {self.hidden})")

    def describe(self):
        info = self.info
        acc = info.get("val_accuracy")
        lines = [f"style classifier: {len(self.labels)} labels, open_clip {self.embedder['name']} (weights "
                 f"{self.embedder['weights_hash']}, dim {self.dim}), hidden {self.hidden}",
                 f"trained on {info.get('images', '?')} images"
                 + (f", top-1 {100 * acc:.1f}% on held-out images" if acc is not None else ""),
                 "labels: " + ", ".join(self.labels[:30]) + (" ..." if len(self.labels) > 30 else "")]
        return "\n".join(lines)

    def check_embedder(self, embedder):
        """Refuse features of another CLIP: the classifier only knows the space it was trained in."""
        name, sha, dim = embedder.name, embedder.weights_hash, int(embedder.dim)
        if (name, sha, dim) != (self.embedder["name"], self.embedder["weights_hash"], self.dim):
            raise MetricsError(
                f"this style classifier was trained on open_clip {self.embedder['name']} features (weights "
                f"{self.embedder['weights_hash']}, dim {self.dim}) but the loaded CLIP is {name} (weights {sha}, dim "
                f"{dim}). Load the same open_clip weights, or train a classifier with this CLIP "
                "(python -m metrics style-train).")

    def probabilities(self, features):
        import torch

        f = np.asarray(features, np.float32)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise MetricsError(f"features of shape {f.shape} for a classifier of {self.dim}-d CLIP features")
        with torch.inference_mode():
            return torch.softmax(self.module(torch.from_numpy(f)), dim=1).numpy().astype(np.float64)

    def label_index(self, label):
        want = norm_label(label)
        for i, name in enumerate(self.labels):
            if norm_label(name) == want:
                return i
        raise MetricsError(f"style {label!r} is not one of the classifier's {len(self.labels)} labels: "
                           f"{', '.join(self.labels[:20])}{' ...' if len(self.labels) > 20 else ''}")

    def top(self, probs, k=3):
        """[[(label, probability), ...] per image], best first."""
        k = max(1, min(int(k), len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for row, p in zip(order, probs)]

    def save(self, path):
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "labels": json.dumps(self.labels),
                "embedder": json.dumps(self.embedder), "hidden": str(self.hidden), "info": json.dumps(self.info)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path


def load_classifier(path):
    """A classifier saved by :meth:`StyleClassifier.save` (safetensors; nothing else is accepted)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsError(f"style classifier not found: '{path}'. Train one with `python -m metrics style-train`.")
    if not path.lower().endswith(".safetensors"):
        raise MetricsError(f"style classifiers are .safetensors files, got '{os.path.basename(path)}'")
    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
        state = load_file(path)
    except Exception as exc:
        raise MetricsError(f"cannot read '{os.path.basename(path)}' ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise MetricsError(f"'{os.path.basename(path)}' is not an Atelier style classifier (no '{FORMAT}' header); "
                           "train one with `python -m metrics style-train`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise MetricsError(f"'{os.path.basename(path)}' has classifier format {meta.get('format_version')}; this "
                           f"Atelier reads version {FORMAT_VERSION}: retrain it")
    labels, embedder, hidden = json.loads(meta["labels"]), json.loads(meta["embedder"]), int(meta["hidden"])
    module = _mlp(int(embedder["dim"]), hidden, len(labels))
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise MetricsError(f"'{os.path.basename(path)}' is damaged: {str(exc).splitlines()[0]}") from None
    return StyleClassifier(module, labels, embedder, hidden, json.loads(meta.get("info", "{}")))


def split_indices(labels, val_fraction, seed):
    """Stratified (train, val) index arrays: about ``val_fraction`` of each label held out (none for labels
    with fewer than 2 images)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val = [], []
    for lab in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) >= 2 else 0
        n_val = min(n_val, len(idx) - 1)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


def train_classifier(features, labels, embedder_info, hidden=512, epochs=100, lr=1e-3, weight_decay=1e-4,
                     batch_size=256, val_fraction=0.1, seed=0, progress=NO_PROGRESS, log=None):
    """Train the two-layer MLP with AdamW and cross-entropy; returns (classifier, report dict with top-1
    accuracy on the training and held-out images)."""
    import torch

    x = np.asarray(features, np.float32)
    labels = [str(v) for v in labels]
    if x.ndim != 2 or len(x) != len(labels):
        raise MetricsError(f"{len(labels)} labels for features of shape {x.shape}")
    names = sorted(set(labels))
    if len(names) < 2:
        raise MetricsError(f"a style classifier needs at least 2 labels; the images have {names or 'none'} "
                           "(check the folder layout Style/artist_title.jpg or the label field)")
    y = np.asarray([names.index(v) for v in labels], np.int64)
    train_idx, val_idx = split_indices(y, val_fraction, seed)
    torch.manual_seed(seed)
    module = _mlp(x.shape[1], hidden, len(names))
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for epoch in range(int(epochs)):
        module.train()
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            batch = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(module(xt[batch]), yt[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress.update(epoch + 1, int(epochs))
        progress.check_interrupt()
    module.eval()
    clf = StyleClassifier(module, names, embedder_info, hidden)

    def accuracy(idx):
        if len(idx) == 0:
            return None
        return float((clf.probabilities(x[idx]).argmax(1) == y[idx]).mean())

    report = {"labels": len(names), "images": len(labels), "train_images": len(train_idx),
              "val_images": len(val_idx), "train_accuracy": accuracy(train_idx), "val_accuracy": accuracy(val_idx),
              "final_loss": float(loss.detach()), "epochs": int(epochs), "hidden": int(hidden),
              "per_label": {n: int((y == i).sum()) for i, n in enumerate(names)}}
    clf.info = {k: report[k] for k in ("images", "train_accuracy", "val_accuracy", "epochs")}
    if log:
        log(f"trained on {len(train_idx)} image(s), {len(names)} labels: top-1 {report['train_accuracy']:.3f} "
            f"(train)" + (f", {report['val_accuracy']:.3f} (held out {len(val_idx)})" if val_idx.size else ""))
    return clf, report


def labelled_features(source, embedder=None, label_field="style", metadata_file=None, db=None, batch_size=32,
                      progress=NO_PROGRESS, log=None):
    """(features [n, d], labels, embedder info, skipped) of a labelled collection.

    ``db``: a loaded style database (``retrieval.db.load_db``) whose rows and metadata are used as they are;
    otherwise ``source`` is an image folder whose files are embedded with ``embedder`` through the cache.
    Images without a label are skipped and named.
    """
    if label_field not in LABEL_FIELDS:
        raise MetricsError(f"label_field must be one of {LABEL_FIELDS}, got {label_field!r}")
    skipped = []
    if db is not None:
        if embedder is not None:
            try:
                db.check_embedder(embedder)
            except ValueError as exc:
                raise MetricsError(str(exc)) from None
        info = {"name": db.embedder_name, "weights_hash": db.embedder_hash, "dim": db.dim}
        feats, labels = [], []
        emb = np.asarray(db.embeddings, dtype=np.float32)
        for row, meta in enumerate(db.metadata):
            label = str(meta.get(label_field) or "").strip()
            if label:
                feats.append(row)
                labels.append(label)
            else:
                skipped.append({"path": meta.get("path", str(row)), "reason": f"no {label_field}"})
        return emb[np.asarray(feats, np.int64)], labels, info, skipped
    if embedder is None:
        raise MetricsError("give the open_clip model that embeds the images (or a style database)")
    table = load_metadata_table(metadata_file) if metadata_file else {}
    ff = folder_features(source, ClipImageFeatures(embedder, batch_size), batch_size=batch_size, progress=progress,
                         log=log)
    skipped.extend(ff.skipped)
    keep, labels = [], []
    for i, rel in enumerate(ff.paths):
        label = str(row_metadata(rel, table).get(label_field) or "").strip()
        if label:
            keep.append(i)
            labels.append(label)
        else:
            skipped.append({"path": rel, "reason": f"no {label_field} (put it in a sub-folder or a metadata table)"})
    info = {"name": embedder.name, "weights_hash": embedder.weights_hash, "dim": int(embedder.dim)}
    return ff.features[np.asarray(keep, np.int64)], labels, info, skipped


def target_accuracy(clf, probs, targets):
    """Top-1 accuracy and mean target probability of images whose intended style is ``targets`` (one label
    for all, or one per image)."""
    if isinstance(targets, str):
        targets = [targets] * len(probs)
    idx = np.asarray([clf.label_index(t) for t in targets], np.int64)
    top1 = probs.argmax(axis=1)
    return float((top1 == idx).mean()), float(probs[np.arange(len(idx)), idx].mean())


def per_style(clf, probs, targets):
    """{style: (images, top-1 accuracy, mean target probability)} grouped by intended style."""
    if isinstance(targets, str):
        targets = [targets] * len(probs)
    groups = {}
    for i, t in enumerate(targets):
        groups.setdefault(clf.labels[clf.label_index(t)], []).append(i)
    out = {}
    for style, idx in sorted(groups.items()):
        acc, prob = target_accuracy(clf, probs[idx], style)
        out[style] = (len(idx), acc, prob)
    return out


def relative_accuracy(clf, probs, targets, base_probs, base_targets):
    """The paper's comparison (its Fig. 4): per style, accuracy of the method and of the baseline, the relative
    improvement (acc − acc_base) / acc_base (None when the baseline never hits the style), and whose mean target
    probability is higher ("voting")."""
    a, b = per_style(clf, probs, targets), per_style(clf, base_probs, base_targets)
    rows = {}
    for style in sorted(set(a) | set(b)):
        na, acc, prob = a.get(style, (0, None, None))
        nb, acc_b, prob_b = b.get(style, (0, None, None))
        rel = None if acc is None or not acc_b else (acc - acc_b) / acc_b
        vote = None if prob is None or prob_b is None else ("method" if prob > prob_b else
                                                            "baseline" if prob_b > prob else "tie")
        rows[style] = {"images": na, "accuracy": acc, "baseline_images": nb, "baseline_accuracy": acc_b,
                       "relative_improvement": rel, "target_probability": prob, "baseline_target_probability": prob_b,
                       "vote": vote}
    acc_all, prob_all = target_accuracy(clf, probs, targets)
    acc_b_all, prob_b_all = target_accuracy(clf, base_probs, base_targets)
    overall = {"accuracy": acc_all, "baseline_accuracy": acc_b_all,
               "relative_improvement": (acc_all - acc_b_all) / acc_b_all if acc_b_all else None,
               "target_probability": prob_all, "baseline_target_probability": prob_b_all,
               "styles_won": sum(1 for r in rows.values() if r["vote"] == "method"), "styles": len(rows)}
    return {"styles": rows, "overall": overall}


def _pct(v):
    return "  n/a" if v is None else f"{100 * v:5.1f}%"


def top_table(labels, tops):
    width = max([5] + [len(x) for x in labels])
    lines = [f"{'image':<{width}}  top styles"]
    for label, top in zip(labels, tops):
        lines.append(f"{label:<{width}}  " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in top))
    return "\n".join(lines)


def relative_table(result, method="method", baseline="baseline"):
    width = max([5] + [len(s) for s in result["styles"]])
    lines = [f"{'style':<{width}}  {method[:10]:>10}  {baseline[:10]:>10}  {'relative':>9}  {'p(target)':>9}  "
             f"{'p base':>7}  vote"]
    for style, r in result["styles"].items():
        rel = "n/a" if r["relative_improvement"] is None else f"{100 * r['relative_improvement']:+.1f}%"
        lines.append(f"{style:<{width}}  {_pct(r['accuracy']):>10}  {_pct(r['baseline_accuracy']):>10}  {rel:>9}  "
                     f"{_pct(r['target_probability']):>9}  {_pct(r['baseline_target_probability']):>7}  {r['vote']}")
    o = result["overall"]
    rel = "n/a" if o["relative_improvement"] is None else f"{100 * o['relative_improvement']:+.1f}%"
    lines.append(f"overall: top-1 {_pct(o['accuracy']).strip()} ({method}) vs {_pct(o['baseline_accuracy']).strip()} "
                 f"({baseline}), relative improvement {rel}; higher target probability in "
                 f"{o['styles_won']} of {o['styles']} style(s)")
    return "\n".join(lines)
