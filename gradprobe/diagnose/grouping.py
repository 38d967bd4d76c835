"""Identical units: group the rows of per-unit feature matrices that are exactly equal.

Units whose incoming weights, bias and outgoing weights are all identical receive identical
gradients, so descent can never separate them (REFERENCE, symmetry traps). This module finds such
groups exactly and in O(n·d):

1. **Signature.** Each row is hashed to ``k`` float64 numbers by a random linear projection, done
   as one float64 matmul per block of rows. Equal rows must get equal signatures whatever kernel,
   blocking or thread split BLAS picks, so the projection is made *exact*: the row (with −0.0
   canonicalised to +0.0) is read as its integer bit pattern (16- or 32-bit words), and the random
   directions are integers small enough that every product and partial sum is an integer below
   2⁵³. Float64 arithmetic on such integers has no rounding, so the result does not depend on the
   order of summation. Two distinct rows collide in one direction with probability ≤ 2⁻ᵐ (``m`` the
   bits of each direction entry), and ``k`` is chosen so that ``k·m ≥ 40``.
2. **Buckets.** The (n, k) signatures are folded into one float64 key per row and ``torch.unique``
   of the keys gives the candidate buckets. Two pre-filters run first on wide rows: rows whose first
   element no other row shares are out, then steps 1-2 on the first few columns of the rest, so a
   matrix with no two rows alike there (any random init) costs a read of one column.
3. **Exact check.** Every candidate row is compared with the first row of its bucket in one
   vectorised pass over all buckets. Rows that differ (hash collisions) go round again with the next
   first row of their bucket; rows containing NaN are dropped, since NaN equals nothing, not even a
   bitwise copy of itself. Nothing is ever grouped without an exact ``==`` on every element.

Equality is IEEE ``==``: for non-NaN values that is bitwise equality once −0.0 is read as +0.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gradprobe.errors import UsageError

__all__ = ["group_identical_rows", "group_identical_units", "effective_width", "sums_all_distinct"]

# Elements hashed per chunk of rows: the float64 copy of a chunk (4 MiB) stays in cache.
_HASH_CHUNK_ELEMENTS = 1 << 19
# Elements compared per chunk of rows in the exact check: the gathered rows and the mask stay in cache.
_COMPARE_CHUNK_ELEMENTS = 1 << 19
# Widest column block per exact matmul, in words; keeps the entries of each direction ≥ 8 bits wide.
_MAX_BLOCK_WORDS = {torch.int16: 1 << 22, torch.int32: 1 << 14}
# Magnitude bits of one word read as a signed integer: |word| ≤ 2^bits.
_WORD_BITS = {torch.int16: 15, torch.int32: 31}
# Largest integer float64 holds exactly is 2^53.
_EXACT_BITS = 53
# Directions: enough for ≥ 40 bits of signature (a pair of distinct rows collides with probability
# ≤ 2^-40; a collision costs one more exact-check round, never a wrong group), within these bounds.
_MIN_DIRECTIONS, _MAX_DIRECTIONS, _TARGET_SIGNATURE_BITS = 4, 8, 40
# Columns per feature read by the pre-filter.
_SAMPLE_COLUMNS = 16
# dtypes whose first column the CPU pre-filter sorts in numpy (bfloat16 has no numpy dtype)
_NUMPY_SORTABLE = (torch.float16, torch.float32, torch.float64)
# Multiplier folding the k signature columns into one key (an irrational-looking odd constant).
_FOLD = 1.6180339887498949


def group_identical_rows(rows: torch.Tensor, *, seed: int = 0) -> list[list[int]]:
    """Return the groups of indices of exactly identical rows of ``rows``.

    Args:
        rows: an (n, d) tensor of any floating dtype (bf16, fp16, fp32, fp64, fp8), on any device.
        seed: seeds the random directions of the signature. It changes only the speed in the
            unlikely case of hash collisions, never the result.

    Returns:
        The groups of size ≥ 2, each sorted ascending, ordered by their first index. Rows are equal
        when every element compares ``==`` (bitwise equal after −0.0 → +0.0); a row containing NaN
        is never grouped.

    Raises:
        UsageError: ``rows`` is not 2-D or not floating point.

    >>> import torch
    >>> w = torch.tensor([[1.0, 2.0], [0.5, 0.5], [1.0, 2.0], [-0.0, 3.0], [0.0, 3.0], [0.5, 0.5]])
    >>> group_identical_rows(w)
    [[0, 2], [1, 5], [3, 4]]
    """
    _check_floating(rows, "rows")
    if rows.dim() != 2:
        raise UsageError(f"rows must be a 2-D (units, features) tensor, got shape {tuple(rows.shape)}")
    return _group_identical([_comparable(rows)], seed=seed)


def group_identical_units(*features: torch.Tensor, seed: int = 0) -> list[list[int]]:
    """Return the groups of units that are exactly identical in *every* feature matrix.

    Each feature holds one row per unit: incoming weights (n, fan_in), a bias (n,) or (n, 1),
    outgoing weights transposed (n, fan_out), activations over a batch (n, batch), … A 1-D tensor is
    read as (n, 1) and trailing dimensions are flattened (a conv weight (out, in, kh, kw) gives one
    row per output channel). The features may have different floating dtypes; each is compared in
    its own dtype, so nothing is rounded.

    Args:
        *features: at least one tensor, all with the same first dimension n and on the same device.
        seed: as in :func:`group_identical_rows`.

    Returns:
        Groups as in :func:`group_identical_rows`: units grouped only if identical in all features.

    Raises:
        UsageError: no feature, a 0-D or non-floating feature, different numbers of units or devices.

    >>> import torch
    >>> weight = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    >>> bias = torch.tensor([0.0, 0.0, 0.1])
    >>> group_identical_units(weight, bias)
    [[0, 1]]
    """
    if not features:
        raise UsageError("group_identical_units needs at least one feature tensor")
    matrices = []
    for position, feature in enumerate(features):
        name = f"feature {position}"
        _check_floating(feature, name)
        if feature.dim() == 0:
            raise UsageError(f"{name} is a scalar; each feature needs one row per unit")
        matrices.append(_comparable(feature.reshape(feature.shape[0], -1)))
    units = {m.shape[0] for m in matrices}
    if len(units) > 1:
        shapes = ", ".join(str(tuple(f.shape)) for f in features)
        raise UsageError(f"features must have the same number of units (first dimension), got {shapes}")
    devices = {m.device for m in matrices}
    if len(devices) > 1:
        raise UsageError(f"features must be on one device, got {sorted(str(d) for d in devices)}")
    return _group_identical(matrices, seed=seed)


def effective_width(n: int, groups: Sequence[Sequence[int]]) -> float:
    """Distinct units over units: 1.0 when no two units are identical, 1/n when all are.

    A group of g identical units counts as one distinct unit. ``n = 0`` gives 1.0 (nothing is
    redundant).

    >>> effective_width(8, [[0, 3], [1, 2, 5]])
    0.625
    """
    if n < 0:
        raise UsageError(f"n must be a number of units ≥ 0, got {n}")
    redundant = sum(len(group) - 1 for group in groups if len(group) > 0)
    if redundant >= n and n > 0:
        raise UsageError(f"groups hold {redundant + len(groups)} units, more than n = {n}")
    return 1.0 if n == 0 else (n - redundant) / n


def sums_all_distinct(row_sums: torch.Tensor) -> bool:
    """True when no two rows can be identical, read off their sums: identical rows have equal sums
    (each row summed on its own, in one fixed order: :func:`gradprobe.stats.sums_and_row_sums`), so
    rows whose sums all differ hold no group. False when two sums are equal or one is NaN (a NaN, or
    +inf and −inf in one row: that proves nothing); the caller then groups the rows themselves.

    >>> import torch
    >>> sums_all_distinct(torch.tensor([0.5, -0.0, 2.0], dtype=torch.float64))
    True
    >>> sums_all_distinct(torch.tensor([0.0, 1.0, -0.0], dtype=torch.float64))
    False
    """
    if row_sums.shape[0] < 2:
        return True
    ordered = np.sort(row_sums.numpy())  # NaN sorts last
    return not (bool(np.isnan(ordered[-1])) or bool((ordered[1:] == ordered[:-1]).any()))


def _check_floating(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise UsageError(f"{name} must be floating point (bf16, fp16, fp32, fp64, fp8), got {tensor.dtype}")


def _comparable(matrix: torch.Tensor) -> torch.Tensor:
    """Detach, and widen 1-byte floats (fp8) to float32: exact, and `==` and bit views then work."""
    matrix = matrix.detach()
    return matrix.float() if matrix.element_size() < 2 else matrix


def _group_identical(features: list[torch.Tensor], *, seed: int) -> list[list[int]]:
    """Core: ``features`` are 2-D floating matrices with the same rows, on one device.

    Pre-filters narrow the rows first: identical rows share their first element, then their first
    few columns in every feature, so only rows that share those can be identical. In a randomly
    initialised matrix almost no two rows share even their first element, and the cost drops from
    a read of every weight to a read of one column (a cache line per row); when rows do share them
    (zero or constant init), the full signature is computed for those rows only.
    """
    n = features[0].shape[0]
    if n < 2:
        return []
    with torch.no_grad():
        rows: torch.Tensor | None = None  # the candidate rows, when the pre-filter narrowed them
        if sum(m.shape[1] for m in features) > 2 * _SAMPLE_COLUMNS:
            # identical rows share their first element: rows whose first element is unique are out
            # (+ 0.0 makes −0.0 equal +0.0; NaN equals nothing, so a NaN row is out too)
            first = features[0][:, 0] + 0.0
            if first.device.type == "cpu" and first.dtype in _NUMPY_SORTABLE:
                # the common case, random weights, in a sort (~10 µs for 1024 rows; torch.unique with
                # inverse and counts ~80 µs): no repeated first element, no identical rows
                ordered = np.sort(first.numpy())
                if not bool((ordered[1:] == ordered[:-1]).any()):
                    return []
            _, inverse, counts = torch.unique(first, return_inverse=True, return_counts=True)
            rows = torch.nonzero(counts[inverse] >= 2).flatten()
            if rows.numel() == 0:
                return []
            sample = [_sample_columns(m).index_select(0, rows) for m in features]
            _, bucket, counts = _buckets(_signatures(sample, seed))
            rows = rows[counts[bucket] >= 2]
            if rows.numel() == 0:
                return []
            if rows.numel() == n:
                rows = None
            else:
                features = [m.index_select(0, rows) for m in features]
        _, bucket, counts = _buckets(_signatures(features, seed))
        candidates = torch.nonzero(counts[bucket] >= 2).flatten()
        members, labels = _verify(features, candidates, bucket[candidates], len(counts))
        if rows is not None:
            members, labels = rows[members], rows[labels]
    return _to_groups(members, labels)


def _sample_columns(matrix: torch.Tensor) -> torch.Tensor:
    """The first ``_SAMPLE_COLUMNS`` columns of ``matrix``: adjacent columns share cache lines, so
    a row-major weight costs one cache line per row (spread-out columns cost one line per element,
    a cold read of most of the matrix)."""
    return matrix[:, :_SAMPLE_COLUMNS]


def _buckets(signatures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.unique(signatures, dim=0, return_inverse=True, return_counts=True)``, up to merges.

    The k columns are folded into one float64 key (elementwise, so equal rows get bit-equal keys on
    any device) and the unique taken in 1-D: ``unique(dim=0)`` sorts rows with a comparator and
    costs ~3 ms for 1024 rows here. Folding may round two different signatures onto one key; that
    merges their buckets, which costs the exact check one more round and never groups a wrong row.
    """
    key = signatures[:, 0].clone()
    for j in range(1, signatures.shape[1]):
        key.mul_(_FOLD).add_(signatures[:, j])
    return torch.unique(key, return_inverse=True, return_counts=True)


def _word_dtype(matrix: torch.Tensor) -> torch.dtype:
    return torch.int32 if matrix.element_size() >= 4 else torch.int16


def _signatures(features: list[torch.Tensor], seed: int) -> torch.Tensor:
    """(n, k) float64 exact integer projections of the rows' bit patterns (see the module docstring)."""
    n, device = features[0].shape[0], features[0].device
    # plan: per feature, its word dtype and column blocks (start, stop, bits per direction entry)
    plans = []
    for matrix in features:
        word = _word_dtype(matrix)
        words = matrix.shape[1] * matrix.element_size() * 8 // torch.iinfo(word).bits
        width = _MAX_BLOCK_WORDS[word]
        blocks = []
        for start in range(0, words, width):
            stop = min(start + width, words)
            bits = min(32, _EXACT_BITS - _WORD_BITS[word] - math.ceil(math.log2(stop - start)))
            blocks.append((start, stop, bits))
        plans.append((word, words, blocks))
    narrowest = min((bits for _, _, blocks in plans for *_, bits in blocks), default=32)
    k = min(_MAX_DIRECTIONS, max(_MIN_DIRECTIONS, math.ceil(_TARGET_SIGNATURE_BITS / narrowest)))

    generator = torch.Generator().manual_seed(seed)
    signatures = torch.zeros(n, k, dtype=torch.float64, device=device)
    for matrix, (word, words, blocks) in zip(features, plans):
        if words == 0:
            continue
        # (k, words) row-major: linear() with this layout is the fastest skinny float64 product here
        directions = [
            torch.randint(0, 2**bits, (k, stop - start), generator=generator, dtype=torch.float64).to(device)
            for start, stop, bits in blocks
        ]
        step = max(1, _HASH_CHUNK_ELEMENTS // words)
        for first in range(0, n, step):
            # + 0.0 turns −0.0 into +0.0 so both have one bit pattern; the result is a fresh tensor
            chunk = (matrix[first : first + step] + 0.0).contiguous().view(word).to(torch.float64)
            for (start, stop, _), direction in zip(blocks, directions):
                # exact: every product and partial sum is an integer below 2^53, whatever the order
                signatures[first : first + step] += torch.nn.functional.linear(
                    chunk[:, start:stop], direction
                )
    # an all-zero sum may come out −0.0 or +0.0 depending on the order; make it +0.0
    return signatures.add_(0.0)


def _verify(
    features: list[torch.Tensor], rows: torch.Tensor, bucket: torch.Tensor, buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact check of candidate ``rows`` (ascending) in their signature ``bucket``.

    Returns (members, labels): each row with the first row of its exact class, labelled by that
    first row's index (classes of one row are dropped later). Every round removes each bucket's
    first remaining row, so the number of rounds is the largest number of distinct exact classes
    sharing one signature: 1 unless the hash collides. Rows holding NaN are dropped after the first
    round, so bitwise copies of a NaN row do not take one round each.
    """
    members, labels = [], []
    while rows.numel() > 0:
        first = torch.full((buckets,), torch.iinfo(rows.dtype).max, dtype=rows.dtype, device=rows.device)
        first = first.scatter_reduce_(0, bucket, rows, reduce="amin")[bucket]
        # a first row is taken as equal to itself without looking: if it holds NaN it ends up a
        # singleton (dropped), since no other row can equal it
        equal = rows == first
        others = torch.nonzero(~equal).flatten()
        if others.numel() > 0:
            equal[others] = _rows_equal(features, rows[others], first[others])
        members.append(rows[equal])
        labels.append(first[equal])
        rows, bucket = rows[~equal], bucket[~equal]
        if rows.numel() == 0:
            break
        # NaN rows never match (not even themselves) and would otherwise take one round each
        finite = ~_has_nan(features, rows)
        rows, bucket = rows[finite], bucket[finite]
        alone = torch.bincount(bucket, minlength=buckets)[bucket] < 2
        rows, bucket = rows[~alone], bucket[~alone]
    if not members:
        empty = torch.empty(0, dtype=torch.long, device=rows.device)
        return empty, empty
    return torch.cat(members), torch.cat(labels)


def _take(matrix: torch.Tensor, index: torch.Tensor, *, ascending: bool) -> torch.Tensor:
    """``matrix[index]`` without a copy when the index is one row repeated or a run of rows."""
    low, high = (int(v) for v in torch.aminmax(index))
    if low == high:
        return matrix[low : low + 1]  # broadcasts against the other side
    if ascending and high - low + 1 == index.numel():
        return matrix[low : high + 1]
    return matrix.index_select(0, index)


def _rows_equal(features: list[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Whether row ``left[i]`` equals row ``right[i]`` in every feature, element by element."""
    equal = torch.ones(left.numel(), dtype=torch.bool, device=left.device)
    width = max(1, sum(matrix.shape[1] for matrix in features))
    step = max(1, _COMPARE_CHUNK_ELEMENTS // width)
    for first in range(0, left.numel(), step):
        a, b = left[first : first + step], right[first : first + step]
        for matrix in features:
            if matrix.shape[1] == 0:
                continue
            same = (_take(matrix, a, ascending=True) == _take(matrix, b, ascending=False)).all(dim=1)
            equal[first : first + step] &= same
    return equal


def _has_nan(features: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Whether row ``rows[i]`` holds a NaN in any feature."""
    found = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    width = max(1, sum(matrix.shape[1] for matrix in features))
    step = max(1, _COMPARE_CHUNK_ELEMENTS // width)
    for first in range(0, rows.numel(), step):
        index = rows[first : first + step]
        for matrix in features:
            if matrix.shape[1] > 0:
                found[first : first + step] |= _take(matrix, index, ascending=True).isnan().any(dim=1)
    return found


def _to_groups(members: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Lists of members sharing a label (the group's first index), singletons dropped."""
    if members.numel() == 0:
        return []
    order = torch.sort(members, stable=True).indices
    members, labels = members[order], labels[order]
    order = torch.sort(labels, stable=True).indices
    members, labels = members[order], labels[order]
    sizes = torch.unique_consecutive(labels, return_counts=True)[1].tolist()
    flat = members.tolist()
    groups, start = [], 0
    for size in sizes:
        if size >= 2:
            groups.append(flat[start : start + size])
        start += size
    return groups
