import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning (GNU OpenMP spins for a while by default). The suite's models
# are tiny and it runs beside its own Ray workers and subprocesses on few cores, where every spinning thread
# takes a core from a process with work to do: on 2 busy cores some tests ran 5-8x slower. Read by libgomp
# when torch loads, so set before any import of torch; subprocesses and Ray workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if sys.prefix != sys.base_prefix:  # in a venv: its own cache of torch's JIT-built ops, as `make` sets (Makefile)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest  # noqa: E402

WORDS = [f"w{i}" for i in range(92)]


SHARED_RAY = "shared_ray"
"""The fixture of the tests that share one private Ray (``ray_utils.private_ray``)."""


def _on_shared_ray(items) -> bool:
    return all(SHARED_RAY in item.fixturenames for item in items)


def pytest_collection_modifyitems(session, config, items):
    """Modules whose every test runs on the shared private Ray run one after another, where the first of them
    was (the others keep their order), so that one Ray serves them all."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)
    shared = [m for m, its in modules.items() if _on_shared_ray(its)]
    if len(shared) < 2:
        return
    order, placed = [], False
    for module, its in modules.items():
        if module in shared:
            if not placed:
                order += [it for m in shared for it in modules[m]]
                placed = True
        else:
            order += its
    items[:] = order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a test on the shared Ray, shut the Ray down unless the next test runs on it too: the others find
    no Ray running in this process (some check that a command starts none)."""
    yield
    ray = sys.modules.get("ray")
    if (SHARED_RAY in item.fixturenames and (nextitem is None or SHARED_RAY not in nextitem.fixturenames)
            and ray is not None and ray.is_initialized()):
        ray.shutdown()


@pytest.fixture
def ray_default_ports():
    """For a test that starts Ray processes binding Ray's fixed default ports, or needs them free
    (``ray_utils.default_ports_lock``)."""
    from ray_utils import default_ports_lock

    with default_ports_lock():
        yield


@pytest.fixture(scope="module")
def ray_default_ports_module():
    """``ray_default_ports`` for a module's cluster."""
    from ray_utils import default_ports_lock

    with default_ports_lock():
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from pearl_ray.testing import make_word_tokenizer

    return make_word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer_dir):
    """Paths of tiny random Llama models sharing one tokenizer: target, a different draft, and a copy."""
    from pearl_ray.testing import save_tiny_llama

    root = tmp_path_factory.mktemp("models")
    target = save_tiny_llama(root / "target", seed=0, num_layers=2, tokenizer_dir=tiny_tokenizer_dir)
    draft = save_tiny_llama(root / "draft", seed=1, num_layers=1, tokenizer_dir=tiny_tokenizer_dir)
    return {"target": str(target), "draft": str(draft)}


@pytest.fixture(scope="session")
def tiny_default_pair(tmp_path_factory):
    """Environment variables that make the names ``default-target`` and ``default-draft`` resolve to a tiny
    random pair (a word tokenizer with a chat template): ``PEARL_RAY_CACHE`` holds the target where the
    embedded one would be converted to, ``PEARL_RAY_DRAFT_DIR`` the draft. For the tests of what runs on the
    default names (the CLI without models, ``serve``, ``jobs/gpu_check.py``) where the embedded pair itself
    is not the subject: ``test_default_pair.py`` runs that one end to end."""
    from pearl_ray.modeling.default_pair import TARGET_DIRNAME
    from pearl_ray.testing import CHAT_TEMPLATE, make_word_tokenizer, save_tiny_llama

    root = tmp_path_factory.mktemp("default_pair")
    tok = make_word_tokenizer(root / "tok", WORDS, CHAT_TEMPLATE)
    save_tiny_llama(root / "cache" / TARGET_DIRNAME, seed=0, num_layers=2, tokenizer_dir=tok)
    save_tiny_llama(root / "draft", seed=1, num_layers=1, tokenizer_dir=tok)
    return {"PEARL_RAY_CACHE": str(root / "cache"), "PEARL_RAY_DRAFT_DIR": str(root / "draft")}


@pytest.fixture
def run_main(capsys):
    """``run_main(main, argv)``: a command's ``main(argv)`` in the test process, returning what the command line
    would give (``returncode``, ``stdout``, ``stderr``). It saves a torch import and start-up per run; torch's
    thread count, its global RNG and the environment (commands set variables for their workers) are restored
    afterwards."""
    from types import SimpleNamespace

    import torch

    def run(main, argv: list[str]) -> SimpleNamespace:
        threads, status, environ = torch.get_num_threads(), 0, dict(os.environ)
        with torch.random.fork_rng(devices=[]):
            try:
                status = main(argv) or 0
            except SystemExit as exc:
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            finally:
                torch.set_num_threads(threads)
                os.environ.clear()
                os.environ.update(environ)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=status, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def run_distill(run_main):
    """``run_distill(argv)``: ``python -m training.distill_draft ARGV``, run in the test process."""
    from training.distill_draft import main

    return lambda argv: run_main(main, argv)


FAMILY_WINDOW = 6
"""The sliding window of the tiny windowed models: prompts and outputs in the tests run well past it."""
FAMILY_MATRIX = {  # name -> (transformers model_type, sliding window)
    "llama": ("llama", None), "qwen2": ("qwen2", None), "qwen3": ("qwen3", None), "mistral": ("mistral", None),
    "mistral-window": ("mistral", FAMILY_WINDOW), "phi3": ("phi3", None), "phi3-window": ("phi3", FAMILY_WINDOW),
    "gemma2": ("gemma2", FAMILY_WINDOW), "gemma3": ("gemma3_text", FAMILY_WINDOW)}


@pytest.fixture(scope="session")
def family_pair(tmp_path_factory, tiny_tokenizer_dir):
    """``family_pair(name)`` -> {"target", "draft"}: paths of a tiny random pair of a ``FAMILY_MATRIX`` family
    sharing the word tokenizer (target 2 layers, draft 1 with other weights), built on first use."""
    from pearl_ray.testing import save_tiny_model

    root = tmp_path_factory.mktemp("families")
    built = {}

    def make(name):
        if name not in built:
            family, window = FAMILY_MATRIX[name]
            built[name] = {role: str(save_tiny_model(root / name / role, family, seed=seed, num_layers=layers,
                                                     window=window, tokenizer_dir=tiny_tokenizer_dir))
                           for role, seed, layers in (("target", 0, 2), ("draft", 1, 1))}
        return built[name]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is fastest, and far faster than two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
