"""Nearest-neighbour search over a memory bank; the only module that knows FAISS.

The CPU index is canonical (it is what gets saved); a GPU clone is used for search on the GPU the
queries come from, when a CUDA build of FAISS is present. Distances are returned as true L2 (FAISS gives
squared L2).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
from numpy.typing import NDArray

from anomaly._runtime import cpu_threads, passive_openmp
from anomaly.errors import BackendError, ConfigError

__all__ = ["NNIndex", "auto_index_string", "one_faiss_thread"]

log = logging.getLogger(__name__)

_MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this (Clustering.h)
_IVF_MIN_ROWS = 4096  # below this an exact scan costs about as much as an IVF's coarse step + lists
_HNSW_MIN_ROWS = 200_000
_ROWS_PER_LIST = 64
_KMEANS_ITERATIONS = 10  # IVF lists: FAISS's 25 cost 2.3x the time and found the same neighbours on bottle
_PROBE_SHARE = 16  # IVF default: nprobe = nlist / 16 lists visited per query
_EXACT_SHARE_INV = 16  # with an approximate index, each image's highest 1/16 of patches are searched exhaustively
_THREAD = threading.local()  # .single: this thread is one of several tasks that already share out the cores


def auto_index_string(n_rows: int) -> str:
    """The index ``auto`` builds for a bank of ``n_rows``.

    Exact ``Flat`` below 4,096 rows; an inverted file of about 64 rows per list up to 200,000 rows
    (probing 1/16 of the lists finds the exact nearest row for 99.9 % of bottle's test patches at
    a 5 % coreset, 5.6x faster than Flat: benchmarks/README.md section 6); HNSW above.
    """
    if n_rows < _IVF_MIN_ROWS:
        return "Flat"
    if n_rows <= _HNSW_MIN_ROWS:
        return f"IVF{2 ** int(math.log2(n_rows / _ROWS_PER_LIST))},Flat"
    return "HNSW32,Flat"


class NNIndex:
    """k-NN search with a FAISS index described by a factory string (``Flat``, ``HNSW32,Flat``, ``IVF1024,Flat``).

    Args:
        index: FAISS factory string, or ``auto`` (:func:`auto_index_string`).
        use_gpu: ``auto`` searches on GPU ``gpu`` when one is given and FAISS sees it (a CUDA build);
            True requires a FAISS GPU (``gpu`` or GPU 0); False keeps the search on the CPU.
        gpu: the CUDA device number the queries' features come from (None: the CPU); see :meth:`place`.
        nprobe: IVF lists visited per query (None: 1/16 of the lists); ef_search: HNSW search depth.
    """

    def __init__(
        self,
        index: str = "Flat",
        *,
        use_gpu: bool | str = "auto",
        gpu: int | None = None,
        nprobe: int | None = None,
        ef_search: int = 128,
    ) -> None:
        self.index_string = index
        self.use_gpu = use_gpu
        self.gpu = gpu
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._cpu: Any = None
        self._search: Any = None
        self._stores_rows = False
        self._exact: NNIndex | None = None  # exhaustive copy of an approximate index, built on first use
        self._resources: Any = None
        self._search_gpu: int | None = None  # the GPU the search runs on now (None: the CPU)
        self._cpu_only = False  # FAISS could not copy this index to a GPU: not tried again on every search
        # FAISS's GPU indexes are not thread-safe, not even to search (their resources' scratch memory has one user
        # at a time): searches on the GPU, and moving the search, take turns; CPU indexes search concurrently
        self._gpu_lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        """Number of indexed rows."""
        return 0 if self._cpu is None else int(self._cpu.ntotal)

    def build(self, bank: NDArray[np.float32], seed: int = 0, *, lists_of: NNIndex | None = None) -> NNIndex:
        """Index the rows of ``bank`` (M, D), training IVF/PQ quantisers on the bank itself.

        ``lists_of``: a built IVF index over similar rows whose trained lists are reused instead (no k-means);
        the cross-fit's held-out banks take the full bank's. Ignored when it is not an IVF index.
        """
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if lists_of is not None and faiss.try_extract_index_ivf(lists_of._cpu) is not None:
            cpu = faiss.clone_index(lists_of._cpu)
            cpu.reset()
        else:
            cpu = self._trained(bank, seed)
        with _faiss_threads(), _unbuildable(self.index_string):
            cpu.add(bank)
        self._attach(cpu)
        return self

    def _trained(self, bank: NDArray[np.float32], seed: int) -> Any:
        import faiss

        string = auto_index_string(len(bank)) if self.index_string == "auto" else self.index_string
        try:
            cpu = faiss.index_factory(bank.shape[1], string, faiss.METRIC_L2)
        except RuntimeError:
            raise ConfigError(f"scorer.params.index: invalid FAISS factory string '{string}'") from None
        why = _not_l2(cpu)
        if why is not None:  # a score is the L2 distance to the nearest bank row: LSH's sqrt(Hamming) was kept
            raise ConfigError(
                f"scorer.params.index: '{string}' does not search by L2 distance ({why}); use Flat, IVF..,Flat, "
                "HNSW..,Flat or a PQ/SQ index"
            )
        if not cpu.is_trained:
            ivf = faiss.extract_index_ivf(cpu) if "IVF" in string else None
            if ivf is not None and len(bank) < _MIN_POINTS_PER_CENTROID * ivf.nlist:
                raise BackendError(
                    f"index '{string}' needs >= {_MIN_POINTS_PER_CENTROID * ivf.nlist} bank rows to train, "
                    f"got {len(bank)}: use fewer lists or 'Flat'"
                )
            if ivf is not None:
                ivf.cp.seed = seed % 2**31  # a C int: a larger random_state overflowed (a traceback)
                ivf.cp.niter = _KMEANS_ITERATIONS
            with _faiss_threads(), _unbuildable(string):
                cpu.train(bank)
        return cpu

    def search(self, queries: NDArray[np.float32], k: int = 1) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """True L2 distances (Q, k) and bank row ids (Q, k) of the k nearest rows.

        FAISS ranks with ``|q|^2 + |b|^2 - 2 q.b`` in float32, which loses ~1e-3 absolute at
        distances of ~50 to cancellation; the distances to the rows found are recomputed directly
        (``|q - b|``) when the index stores its rows, so they are exact to float32 rounding and
        stable against tiny feature differences (the exported runtime's parity depends on it).

        FAISS marks a neighbour it did not find with id -1 and the largest float as its squared distance (a
        "distance" of 1.8e19). A finite query of an IVF index whose probed lists hold fewer than ``k`` rows (a large
        ``k``, a held-out bank in the full bank's lists) is searched again over every row instead; a query with a
        NaN or infinite feature finds no row, and its distances are NaN, so the scores say so.
        """
        if self._search is None:
            raise BackendError("NNIndex.search called before build/deserialize")
        k = min(k, self.ntotal)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        search = self._search  # the index searched now, even if another thread moves the search meanwhile
        with self._gpu_lock if search is not self._cpu else nullcontext(), _faiss_threads():
            sq, ids = search.search(queries, k)
        lost = (ids < 0).any(1) & np.isfinite(queries).all(1)
        if lost.any() and self.approximate:
            sq[lost], ids[lost] = self._search_every_row(queries[lost], k)
        found = ids >= 0
        if self._stores_rows and len(queries):
            rows = self._cpu.reconstruct_batch(np.where(found, ids, 0).ravel()).reshape(*ids.shape, -1)
            dist = np.linalg.norm(queries[:, None, :] - rows, axis=2)
        else:
            dist = np.sqrt(np.maximum(sq, 0, out=sq), out=sq)
        dist[~found] = np.nan
        return dist, ids

    def _search_every_row(self, queries: NDArray[np.float32], k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Squared distances and ids of an exhaustive search (an IVF index probing every list where its rows are
        compressed); for the queries whose approximate search found fewer than ``k`` rows."""
        import faiss

        if self._stores_rows:
            dist, ids = self.search_exact(queries, k)
            return np.square(dist), ids
        every = faiss.clone_index(self._cpu)  # not the shared index: another thread may search it meanwhile
        ivf = faiss.try_extract_index_ivf(every)
        if ivf is not None:
            ivf.nprobe = ivf.nlist
        with _faiss_threads():
            sq, ids = every.search(queries, k)
        return sq, ids

    def search_images(self, queries: NDArray[np.float32], k: int = 1) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """:meth:`search` for the patches of images, (N, P, D) -> (N * P, k) distances and ids.

        With an approximate index that keeps its rows uncompressed (``IVF..,Flat``, ``HNSW..,Flat``), each
        image's highest 1/16 of patches are searched again exhaustively, and any other patch whose approximate
        distance exceeds the exact ones found, so an image's peak (its score) and the map's peaks are exact distances;
        elsewhere a missed nearest row can only overestimate a distance.
        """
        n_img, n_patch, d = queries.shape
        flat = queries.reshape(-1, d)
        dist, ids = self.search(flat, k)
        if self.approximate and self._stores_rows and len(flat):  # compressed rows (PQ) cannot be re-searched
            patch = dist.mean(1).reshape(n_img, n_patch)
            top = patch >= np.quantile(patch, 1 - 1 / _EXACT_SHARE_INV, axis=1, keepdims=True)
            dist[top.ravel()], ids[top.ravel()] = self.search_exact(flat[top.ravel()], k)
            # an approximate distance only overestimates, so a patch outside the top whose approximate score is above
            # its image's exact peak may be the true peak: searched exhaustively too (none on bottle or screw)
            patch = dist.mean(1).reshape(n_img, n_patch)
            peak = np.where(top, patch, -np.inf).max(1, keepdims=True)
            more = (~top & (patch > peak)).ravel()
            if more.any():
                dist[more], ids[more] = self.search_exact(flat[more], k)
        return dist, ids

    @property
    def approximate(self) -> bool:
        """True when :meth:`search` may miss the nearest row (IVF, HNSW), so :meth:`search_exact` differs."""
        import faiss

        return self._cpu is not None and not isinstance(faiss.downcast_index(self._cpu), faiss.IndexFlat)

    def search_exact(self, queries: NDArray[np.float32], k: int = 1) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """As :meth:`search`, by an exhaustive scan of the stored rows (for the queries where exactness matters)."""
        if not self.approximate:
            return self.search(queries, k)
        if self._exact is None:
            if not self._stores_rows:
                raise BackendError(f"index '{self.index_string}' keeps no rows to search exhaustively")
            rows = self._cpu.reconstruct_n(0, self._cpu.ntotal)
            self._exact = NNIndex("Flat", use_gpu=self.use_gpu, gpu=self.gpu).build(rows)
        return self._exact.search(queries, k)

    def serialize(self) -> NDArray[np.uint8]:
        """The CPU index as bytes (faiss.serialize_index)."""
        import faiss

        return faiss.serialize_index(self._cpu)

    def deserialize(self, data: NDArray[np.uint8]) -> NNIndex:
        """Restore an index written by :meth:`serialize`; unreadable bytes raise ValueError."""
        import faiss

        try:
            cpu = faiss.deserialize_index(np.asarray(data, dtype=np.uint8))
        except (RuntimeError, MemoryError, OverflowError) as exc:  # crafted sizes ask for absurd allocations
            raise ValueError(f"not a readable FAISS index ({type(exc).__name__})") from None
        self._attach(cpu)
        return self

    def check_matches(self, bank: NDArray[np.float32], index: str) -> None:
        """Raise ValueError unless this index is of the configured type and holds exactly ``bank`` (compressed rows:
        as the index encodes them)."""
        import faiss

        string = auto_index_string(len(bank)) if index == "auto" else index
        expected = type(faiss.downcast_index(faiss.index_factory(bank.shape[1], string, faiss.METRIC_L2)))
        actual = faiss.downcast_index(self._cpu)
        if not isinstance(actual, expected):
            raise ValueError(f"index type {type(actual).__name__} does not match the configured '{string}'")
        if self._cpu.d != bank.shape[1] or self._cpu.ntotal != len(bank) or self._cpu.metric_type != faiss.METRIC_L2:
            held = f"{self._cpu.ntotal} rows of dimension {self._cpu.d}"
            raise ValueError(f"index holds {held}, the bank {len(bank)} of {bank.shape[1]}")
        try:
            stored = self._cpu.reconstruct_n(0, self._cpu.ntotal)
        except RuntimeError:  # index types without stored vectors: type, size and dimension checked above
            return
        if not _stores_rows(self._cpu):  # compressed rows (PQ, SQ) read back as the index encodes the bank
            codec = faiss.downcast_index(self._cpu)
            storage = getattr(codec, "storage", None)  # HNSW: the codec is its storage's
            codec = codec if storage is None else faiss.downcast_index(storage)
            try:
                bank = codec.sa_decode(codec.sa_encode(bank))
            except RuntimeError:  # no standalone codec: type, size and dimension checked above
                return
        if not np.array_equal(stored, bank):
            raise ValueError("index rows differ from the saved bank")

    def _attach(self, cpu: Any) -> None:
        import faiss

        for sub in (cpu, _downcast_hnsw(cpu)):
            if sub is not None and hasattr(sub, "hnsw"):
                sub.hnsw.efSearch = self.ef_search
        ivf = faiss.try_extract_index_ivf(cpu)
        if ivf is not None:
            ivf.nprobe = self.nprobe or max(1, ivf.nlist // _PROBE_SHARE)
        self._stores_rows = _stores_rows(cpu)
        self._cpu, self._cpu_only = cpu, False
        self._search, self._search_gpu = cpu, None
        self.place(self.gpu, force=True)

    def place(self, gpu: int | None, *, force: bool = False) -> NNIndex:
        """Search on CUDA device ``gpu`` (None: the CPU) as ``use_gpu`` allows; nothing to do when already there.

        ``auto`` follows the queries: a model run on the CPU keeps FAISS off the GPU, and one run on
        ``cuda:1`` searches on GPU 1. HNSW has no GPU version and always searches on the CPU; other types FAISS
        cannot copy to a GPU search on the CPU with ``auto`` and raise BackendError with True.
        """
        import faiss

        self.gpu = gpu
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.use_gpu is True and gpus == 0:
            raise BackendError("scorer.params.use_gpu: true but FAISS sees no GPU (install a CUDA FAISS build)")
        target = None
        if self.use_gpu is True:
            target = gpu if gpu is not None and gpu < gpus else 0
        elif self.use_gpu == "auto" and gpu is not None and gpu < gpus:
            target = gpu
        if "HNSW" in self.index_string or "HNSW" in type(faiss.downcast_index(self._cpu)).__name__:
            target = None  # ``auto`` builds HNSW above 200,000 rows too
        if self._cpu_only:
            target = None
        if target == self._search_gpu and not force:
            return self
        with self._gpu_lock:
            self._move(target)
        return self

    def _move(self, target: int | None) -> None:
        """:meth:`place`'s move of the search to GPU ``target`` (None: the CPU)."""
        import faiss

        self._exact = None
        if target is not None:
            resources = faiss.StandardGpuResources()  # must outlive the GPU index
            try:
                search = faiss.index_cpu_to_gpu(resources, target, self._cpu)
            except RuntimeError as exc:  # no GPU version of this type (PQ, SQ8, LSH, NSG, refine) or of its sizes
                reason = str(exc).strip().splitlines()[-1]
                if self.use_gpu is True:
                    raise BackendError(
                        f"scorer.params.use_gpu: true but FAISS cannot search '{self.index_string}' on a GPU ({reason})"
                    ) from None
                log.info("FAISS search on the CPU: no GPU version of index '%s' (%s)", self.index_string, reason)
                target, self._cpu_only = None, True
            else:
                self._search, self._resources = search, resources
                log.info("FAISS search on GPU %d", target)
        if target is None:
            self._search, self._resources = self._cpu, None
        self._search_gpu = target

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy``) get the CPU index and their own lock; the search moves to a GPU
        again on the next :meth:`place` (a GPU index cannot be pickled)."""
        state = self.__dict__.copy()
        del state["_gpu_lock"]
        state.update(_search=self._cpu, _search_gpu=None, _resources=None, _exact=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._gpu_lock = threading.Lock()


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """FAISS calls of this thread use one OpenMP thread inside: for a task that runs beside others, one per core
    (the memory bank's fold picks), where each search on every core multiplied the threads by the tasks."""
    _THREAD.single = True
    try:
        yield
    finally:
        _THREAD.single = False


@contextmanager
def _faiss_threads() -> Iterator[None]:
    """FAISS's OpenMP threads for one call, restored afterwards.

    With spinning OpenMP threads, FAISS on all cores ran 2.8x slower than on one whenever the cores were
    shared; with passive waiting (the CLI's setting) all cores are 1.7x faster. FAISS and torch share one
    OpenMP runtime (torch loaded first), so a lasting setting would set the backbone's threads too: it left
    torch on one thread of two after the first fit of a Python process, where predicting bottle's 83 test
    images then took 2.90 s instead of 2.75 s, and the features of that first fit differed from a second
    fit's by 1e-5 (thresholds 0.07 % apart).
    """
    import faiss

    before = faiss.omp_get_max_threads()
    # not os.cpu_count(): a Ray actor's reservation, a container's quota, OMP_NUM_THREADS; one inside a parallel task
    cores = 1 if getattr(_THREAD, "single", False) else cpu_threads()
    faiss.omp_set_num_threads(cores if passive_openmp() else max(1, cores // 2))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextmanager
def _unbuildable(string: str) -> Iterator[None]:
    """ConfigError for a factory string FAISS parses but cannot train or fill with plain rows (``IDMap,Flat`` asks
    for ids with every row): a traceback before."""
    try:
        yield
    except RuntimeError as exc:
        reason = re.search(r"\.(?:cpp|h):\d+: (.+)", str(exc))
        detail = reason.group(1) if reason else str(exc).strip().splitlines()[-1]
        raise ConfigError(f"scorer.params.index: FAISS cannot build '{string}' on the bank ({detail})") from None


def _not_l2(index: Any) -> str | None:
    """Why the distances a FAISS index returns are not L2 distances between the rows it was given, or None: IVF,
    HNSW, PQ and SQ indexes and non-whitening projections (PCA, OPQ, random rotations) return L2 distances or
    approximations of them; LSH and spectral hashing compare binary codes, L2norm, ITQ and whitening PCA measure
    other vectors than the rows. A refined index returns its refinement's distances."""
    import faiss

    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_L2:
        return "its metric is not L2"
    if isinstance(index, faiss.IndexRefine):
        return _not_l2(index.refine_index)
    if isinstance(index, (faiss.IndexLSH, faiss.IndexIVFSpectralHash)):
        return "it compares binary codes: Hamming distances"
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain  # a SWIG vector (the stubs say a list)
        for i in range(chain.size()):
            transform = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(transform, faiss.NormalizationTransform):
                return "L2norm scales every row to length 1"
            if isinstance(transform, faiss.ITQTransform):
                return "ITQ normalises the rows"
            if isinstance(transform, faiss.PCAMatrix) and transform.eigen_power != 0:
                return "PCAW whitens the rows"
        return _not_l2(index.index)
    return None


def _downcast_hnsw(index: Any) -> Any:
    import faiss

    try:
        return faiss.downcast_index(index)
    except Exception:  # noqa: BLE001 - not every index type downcasts
        return None


def _stores_rows(index: Any) -> bool:
    """True when ``index`` keeps its rows uncompressed (Flat, HNSW..,Flat, IVF..,Flat): they can be read back."""
    import faiss

    index = faiss.downcast_index(index)
    storage = getattr(index, "storage", None)  # HNSW: the flat or compressed index it navigates
    rows = faiss.downcast_index(storage) if storage is not None else index
    if isinstance(rows, faiss.IndexIVFFlat):
        rows.make_direct_map()  # IVF lists have no id -> row lookup until asked
        return True
    return isinstance(rows, faiss.IndexFlat) and index.ntotal > 0
