"""Offline checks of the cluster configurations under ``clusters/`` (no network, no cloud, no cluster).

- Ray cluster launcher configs (``clusters/*.yaml``): Ray's own JSON schema and checks, the way ``ray up``
  runs them before it contacts a cloud (``prepare_config`` fills in the provider's defaults, then
  ``validate_config`` checks against ``ray/autoscaler/ray-schema.json`` of the installed ray), plus what this
  project needs (a GPU worker type, the repo mounted and installed on every node, torch pinned first).
- KubeRay manifests (``RayCluster``, ``RayJob``, ``RayService`` anywhere under ``clusters/``): the fields
  KubeRay requires, GPU requests, the embedded Serve config and the job's entrypoint.
- Serve configs: Ray Serve's schema; each ``import_path`` imports, and the app's args are a valid ServeConfig.
- Every command the files name (``python <script>``, ``python -m <module> [subcommand]``) runs ``--help``
  successfully here, and its parser knows every flag the file passes it; every ``clusters/`` path and
  every repo file named on a node exists.

Each checker returns a list of problems; a negative test per checker feeds it a broken copy.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
RAY_VERSION = importlib.metadata.version("ray")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
# Where the launcher configs and the image put the repo on the nodes.
REPO_MOUNTS = ("~/pearl-ray", "/home/ray/pearl-ray")


# --------------------------------------------------------------------------------------------------------------
# files


def launcher_files() -> list[Path]:
    return sorted(CLUSTERS.glob("*.yaml"))


def yaml_files() -> list[Path]:
    return sorted(CLUSTERS.rglob("*.yaml"))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in yaml_files() for d in load_docs(p)
            if isinstance(d, dict) and d.get("kind") in KUBERAY_KINDS]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --------------------------------------------------------------------------------------------------------------
# what a text names: commands with their flags, import paths, files


PY_SCRIPT = re.compile(r"\bpython3?\s+((?:~/pearl-ray/|/home/ray/pearl-ray/)?[\w./-]+\.py)\b([^\n]*)")
# `python -m module`, with a subcommand when a bare word follows (`python -m pearl_ray serve`)
PY_MODULE = re.compile(r"\bpython3?\s+-m\s+([\w.]+)(?:\s+([a-z][a-z_-]*)(?=\s|$))?([^\n]*)")
IMPORT_PATH = re.compile(r"\bimport_path:\s*['\"]?([\w.]+:\w+)")
CLUSTER_PATH = re.compile(r"(?<![\w/.-])(clusters/[\w./-]*[\w])")
MOUNTED_PATH = re.compile(r"(?:~/pearl-ray|/home/ray/pearl-ray)/([\w./-]*[\w])")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def repo_path(name: str) -> str:
    for mount in REPO_MOUNTS:
        if name.startswith(mount + "/"):
            return name[len(mount) + 1:]
    return name


@functools.lru_cache(maxsize=None)
def run_help(command: tuple[str, ...]) -> tuple[int, str]:
    """(exit status, output) of ``python COMMAND --help`` run in the repo, as a node runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    return res.returncode, res.stdout + res.stderr


def named_commands(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """Each ``python <script>`` / ``python -m <module> [subcommand]`` in ``text``: (the command, the flags
    passed to it on its line, up to a `` -- `` or a comment)."""
    text = text.replace("\\\n", " ")  # shell line continuations: one command per line
    found = []
    for script, rest in PY_SCRIPT.findall(text):
        found.append(((repo_path(script),), FLAG.findall(rest.split(" -- ")[0].split(" #")[0])))
    for module, sub, rest in PY_MODULE.findall(text):
        command = ("-m", module, sub) if sub else ("-m", module)
        found.append((command, FLAG.findall(rest.split(" -- ")[0].split(" #")[0])))
    return found


def help_options(output: str) -> set[str]:
    """The options an argparse ``--help`` lists: the option column of its option lines (a flag that only
    appears in another option's description does not count)."""
    options = set()
    for line in output.splitlines():
        if re.match(r" {1,6}-", line):
            options.update(FLAG.findall(re.split(r"\s{2,}", line.strip())[0]))
    return options


def command_problems(command: tuple[str, ...], flags: list[str], where: str) -> list[str]:
    """A command must run ``--help`` successfully, and its parser must know every flag passed to it."""
    shown = " ".join(("python", *command))
    if command[0] != "-m" and not (REPO / command[0]).is_file():
        return [f"{where}: `{shown}`: no such file in the repo"]
    status, output = run_help(command)
    if status != 0:
        return [f"{where}: `{shown} --help` exits {status}: {output.strip().splitlines()[-1:]}"]
    known = help_options(output)
    return [f"{where}: `{shown}` has no option {flag}" for flag in flags if flag not in known]


def reference_problems(text: str, where: str) -> list[str]:
    """Problems with everything ``text`` names: commands, import paths, clusters/ files, repo files on nodes."""
    problems = []
    for command, flags in named_commands(text):
        problems += command_problems(command, flags, where)
    for target in IMPORT_PATH.findall(text):
        problems += import_path_problems(target, where)
    for name in CLUSTER_PATH.findall(text):
        if not (REPO / name).exists():
            problems.append(f"{where}: names {name}, which does not exist")
    for name in MOUNTED_PATH.findall(text):
        if not (REPO / name).exists():
            problems.append(f"{where}: names the repo's {name}, which does not exist")
    return problems


def import_path_problems(target: str, where: str) -> list[str]:
    """``module:attr`` must import (as Serve imports it) and name something."""
    module, _, attr = target.partition(":")
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return [f"{where}: import_path {target}: {module} does not import: {exc}"]
    if not hasattr(imported, attr):
        return [f"{where}: import_path {target}: {module} defines no {attr}"]
    return []


def strings(value) -> list[str]:
    """Every string inside a parsed YAML document; a list of strings (a container's command) also joined
    into one command line."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        joined = [" ".join(value)] if value and all(isinstance(v, str) for v in value) else []
        return joined + [s for v in value for s in strings(v)]
    return []


# --------------------------------------------------------------------------------------------------------------
# checker: Ray cluster launcher config


def launcher_problems(config: dict) -> list[str]:
    """Ray's own validation (schema + checks, before and after ``prepare_config``) and this project's needs."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        # the file as written (catches typos that the provider's defaults would hide), then as `ray up` sees it
        validate_config(copy.deepcopy(config))
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, RuntimeError, AssertionError, KeyError) as exc:
        return [f"ray rejects the config: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    problems = []
    if prepared["provider"]["type"] not in ("aws", "gcp"):
        problems.append(f"provider {prepared['provider']['type']!r}: expected aws or gcp")
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    gpu_types = [name for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1]
    if not gpu_types:
        problems.append("no worker node type advertises GPUs (resources: {GPU: N})")
    for name in gpu_types:
        t = types[name]
        if not 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]:
            problems.append(f"{name}: need 0 <= min_workers <= max_workers <= the global max_workers")
    if not prepared.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be > 0")
    mounts = [remote for remote, local in prepared["file_mounts"].items() if local in (".", "./")]
    if len(mounts) != 1:
        problems.append("file_mounts must copy the repo root ('.') to one remote path")
        return problems
    (mount,) = mounts
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    for side in ("head_setup_commands", "worker_setup_commands"):
        commands = "\n".join(prepared[side])  # setup_commands are merged in by prepare_config
        needs = {f"torch=={torch_pin}": f"pip install .* torch=={re.escape(torch_pin)}\\b",
                 "ray[default,serve]": rf"ray\[default,serve\]=={re.escape(RAY_VERSION)}",
                 f"-r {mount}/requirements.txt": rf"pip install .*-r {re.escape(mount)}/requirements\.txt",
                 f"--no-deps -e {mount}": rf"pip install .*--no-deps -e {re.escape(mount)}\s*$"}
        for what, pattern in needs.items():
            if not re.search(pattern, commands, re.M):
                problems.append(f"{side} must install {what}")
        torch_at = re.search(r"torch==", commands)
        req_at = re.search(r"-r \S*requirements\.txt", commands)
        if torch_at and req_at and torch_at.start() > req_at.start():
            problems.append(f"{side}: install torch before requirements.txt (it picks the torch build)")
    for side in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any("ray start" in c for c in prepared[side]):
            problems.append(f"{side} must run `ray start`")
    docker = prepared.get("docker") or {}
    hf_homes = {side: [o for o in docker.get("run_options", []) + docker.get(f"{side}_run_options", [])
                       if "HF_HOME=" in o][-1:] for side in ("head", "worker")}
    if not hf_homes["head"] or hf_homes["head"] != hf_homes["worker"]:
        problems.append(f"set one HF_HOME for every node (docker run_options): presets resolve on the head "
                        f"and load on the workers, got {hf_homes}")
    for key in ("image", "head_image", "worker_image"):
        if key in docker and not docker[key].startswith(f"rayproject/ray:{RAY_VERSION}-"):
            problems.append(f"docker.{key} {docker[key]!r}: expected a rayproject/ray:{RAY_VERSION}-* image")
    return problems


# --------------------------------------------------------------------------------------------------------------
# checker: KubeRay manifests


def cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"),
            "RayJob": spec.get("rayClusterSpec")}.get(doc.get("kind"))


def pod_problems(template, where: str) -> tuple[list[str], list[dict]]:
    """(problems, containers) of a pod template: containers with images, mounts backed by volumes."""
    spec = (template or {}).get("spec") or {}
    containers = spec.get("containers") or []
    problems = [] if containers else [f"{where}: template.spec.containers is empty"]
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for c in containers:
        if not (isinstance(c.get("image"), str) and c["image"].strip()):
            problems.append(f"{where}: container {c.get('name')!r} has no image")
        limits = (c.get("resources") or {}).get("limits") or {}
        if not {"cpu", "memory"} <= set(limits):
            problems.append(f"{where}: container {c.get('name')!r} needs resources.limits cpu and memory "
                            f"(KubeRay derives Ray's num-cpus and memory from them)")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                problems.append(f"{where}: volumeMount {m.get('name')!r} has no volume")
    return problems, containers


def start_params_problems(params, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}: rayStartParams must be a mapping (may be empty)"]
    return [f"{where}: rayStartParams.{k} must be a string, got {v!r}" for k, v in params.items()
            if not isinstance(v, str)]


def gpu_problems(container: dict, where: str) -> tuple[list[str], bool]:
    """(problems, has_gpus): nvidia.com/gpu must be in both requests and limits, equal, a positive count."""
    resources = container.get("resources") or {}
    requests_, limits = resources.get("requests") or {}, resources.get("limits") or {}
    gpu = "nvidia.com/gpu"
    if gpu not in requests_ and gpu not in limits:
        return [], False
    if gpu not in requests_ or gpu not in limits:
        return [f"{where}: {gpu} must be in both resources.requests and resources.limits"], True
    if str(requests_[gpu]) != str(limits[gpu]) or not str(limits[gpu]).isdigit() or int(limits[gpu]) < 1:
        return [f"{where}: {gpu} requests and limits must be the same positive integer"], True
    return [], True


def serve_config_problems(config, where: str) -> list[str]:
    """Problems of a Serve config (a ``serve deploy`` file or a RayService's serveConfigV2)."""
    from pydantic import ValidationError

    from pearl_ray.serve.config import ServeConfig

    if not isinstance(config, dict) or not config.get("applications"):
        return [f"{where}: a Serve config needs `applications`"]
    problems = []
    for app in config["applications"]:
        target = app.get("import_path")
        if not target:
            problems.append(f"{where}: application {app.get('name')!r} has no import_path")
            continue
        problems += import_path_problems(target, where)
        if target.startswith("pearl_ray.serve:"):
            try:
                ServeConfig.model_validate(app.get("args") or {})
            except ValidationError as exc:
                problems.append(f"{where}: args are not a valid ServeConfig: {exc}")
    return problems


def kuberay_problems(doc: dict, where: str = "manifest") -> tuple[list[str], list[str]]:
    """Problems of a RayCluster / RayJob / RayService."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    if doc.get("kind") not in KUBERAY_KINDS:
        return problems + [f"{where}: kind must be one of {KUBERAY_KINDS}, got {doc.get('kind')!r}"]
    name = (doc.get("metadata") or {}).get("name")
    if not (isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?", name)):
        problems.append(f"{where}: metadata.name {name!r} must be a short DNS-1123 label")
    spec = cluster_spec(doc)
    if not isinstance(spec, dict):
        return problems + [f"{where}: no Ray cluster spec (spec / rayClusterConfig / rayClusterSpec)"]
    if str(spec.get("rayVersion")) != RAY_VERSION:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != the repo's ray {RAY_VERSION}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{where}: headGroupSpec is missing")
    else:
        problems += start_params_problems(head.get("rayStartParams"), f"{where}: headGroupSpec")
        problems += pod_problems(head.get("template"), f"{where}: headGroupSpec")[0]
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        problems.append(f"{where}: workerGroupSpecs is missing or empty")
        groups = []
    gpu_groups = 0
    for i, group in enumerate(groups):
        gw = f"{where}: workerGroupSpecs[{i}]"
        if not group.get("groupName"):
            problems.append(f"{gw}: no groupName")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            problems.append(f"{gw}: replicas, minReplicas and maxReplicas must be integers >= 0")
        elif not counts[0] <= counts[1] <= counts[2] or counts[2] < 1:
            problems.append(f"{gw}: need minReplicas <= replicas <= maxReplicas and maxReplicas >= 1")
        problems += start_params_problems(group.get("rayStartParams"), gw)
        pod, containers = pod_problems(group.get("template"), gw)
        problems += pod
        has_gpus = False
        for c in containers:
            p, has = gpu_problems(c, f"{gw}: container {c.get('name')!r}")
            problems += p
            has_gpus |= has
        gpu_groups += has_gpus
    if groups and not gpu_groups:
        problems.append(f"{where}: no worker group requests nvidia.com/gpu")
    kind, top = doc["kind"], doc.get("spec") or {}
    if kind == "RayService":
        text = top.get("serveConfigV2")
        if not isinstance(text, str):
            problems.append(f"{where}: serveConfigV2 must be a string (the Serve config file's text)")
        else:
            try:
                serve_config = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                problems.append(f"{where}: serveConfigV2 is not YAML: {exc}")
            else:
                problems += serve_config_problems(serve_config, f"{where}: serveConfigV2")
                host = ((serve_config or {}).get("http_options") or {}).get("host")
                if host != "0.0.0.0":
                    problems.append(f"{where}: serveConfigV2 http_options.host must be 0.0.0.0 for KubeRay")
    if kind == "RayJob":
        entrypoint = top.get("entrypoint")
        if not (isinstance(entrypoint, str) and entrypoint.strip()):
            problems.append(f"{where}: RayJob needs an entrypoint")
        else:
            if re.search(r"&&|\|\||[;|`]|\$\(", entrypoint):
                problems.append(f"{where}: the entrypoint passes through the submitter's shell: "
                                f"no &&, ;, | or substitutions")
            if not PY_SCRIPT.search(entrypoint) and not PY_MODULE.search(entrypoint):
                problems.append(f"{where}: the entrypoint runs no `python <script>` or `python -m <module>`")
            problems += reference_problems(entrypoint, f"{where}: entrypoint")
        if "shutdownAfterJobFinishes" not in top:
            problems.append(f"{where}: set shutdownAfterJobFinishes (GPU clusters should not outlive the job)")
    return problems


def report(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------------------
# tests: the files


def test_the_expected_files_exist():
    names = {rel(p) for p in CLUSTERS.rglob("*") if p.is_file()}
    for name in ("clusters/aws-p5.yaml", "clusters/gcp-a3.yaml", "clusters/kuberay/raycluster.yaml",
                 "clusters/kuberay/rayservice.yaml", "clusters/kuberay/rayjob.yaml", "clusters/README.md",
                 "clusters/serve/pearl.yaml", "clusters/serve/rayservice.yaml"):
        assert name in names
    kinds = {d["kind"] for _, d in kuberay_manifests()}
    assert kinds == set(KUBERAY_KINDS)


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    config = yaml.safe_load(path.read_text())
    report(launcher_problems(config))
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU") == 8 for t in workers)  # one 8x H100 node type


@pytest.mark.parametrize("path, index", [(p, i) for p in yaml_files() for i, d in enumerate(load_docs(p))
                                         if isinstance(d, dict) and d.get("kind") in KUBERAY_KINDS],
                         ids=lambda v: rel(v) if isinstance(v, Path) else str(v))
def test_kuberay_manifest(path, index):
    doc = load_docs(path)[index]
    report(kuberay_problems(doc, f"{rel(path)}[{index}]"))


def serve_files() -> list[Path]:
    """The plain Serve config files (for `serve run` / `serve deploy`), not the KubeRay manifests beside them."""
    return [p for p in sorted(CLUSTERS.rglob("*.yaml")) if "applications" in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", serve_files(), ids=rel)
def test_serve_config_files(path):
    report(serve_config_problems(yaml.safe_load(path.read_text()), rel(path)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic deprecations inside ray.serve
def test_serve_configs_match_rays_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    configs = [yaml.safe_load(p.read_text()) for p in serve_files()]
    configs += [yaml.safe_load(d["spec"]["serveConfigV2"]) for _, d in kuberay_manifests() if d["kind"] == "RayService"]
    assert len(configs) >= 4
    for config in configs:
        assert ServeDeploySchema.model_validate(config).applications


def test_kuberay_volumes_and_images_are_consistent():
    """The claims the manifests mount are defined in clusters/kuberay/; one image; GPU groups sized alike."""
    claims = {d["metadata"]["name"] for p in (CLUSTERS / "kuberay").glob("*.yaml") for d in load_docs(p)
              if d.get("kind") == "PersistentVolumeClaim"}
    for path in (CLUSTERS / "kuberay").glob("*.yaml"):
        for doc in load_docs(path):
            if doc.get("kind") not in KUBERAY_KINDS:
                continue
            spec = cluster_spec(doc)
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
            for t in templates:
                for v in t["spec"].get("volumes") or []:
                    if "persistentVolumeClaim" in v:
                        assert v["persistentVolumeClaim"]["claimName"] in claims, rel(path)
            images = {c["image"] for t in templates for c in t["spec"]["containers"]}
            assert len(images) == 1, f"{rel(path)}: one image for head and workers, got {images}"
            gpus = {c["resources"]["limits"].get("nvidia.com/gpu") for t in templates[1:]
                    for c in t["spec"]["containers"]}
            assert gpus == {"8"}, rel(path)


def test_versions_match_the_repo():
    """Ray images and versions equal the installed ray; torch pins equal requirements.txt."""
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", "")]
    assert CLUSTERS / "Dockerfile" in files
    for path in files:
        text = path.read_text()
        for version in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text):
            assert version == RAY_VERSION, rel(path)
        for version in re.findall(r"ray\[[\w,]+\]==(\S+?)[\"'\s]", text):
            assert version == RAY_VERSION, rel(path)
        for version in re.findall(r"\btorch==(\d[\w.+]*)", text):
            assert version == torch_pin, rel(path)


@pytest.mark.parametrize("path", sorted(p for p in CLUSTERS.rglob("*") if p.is_file()), ids=rel)
def test_everything_named_exists_and_runs(path):
    """The commands a file names run `--help` and take the flags the file gives them; paths named exist."""
    text = path.read_text()
    problems = reference_problems(text, rel(path))
    if path.suffix == ".yaml":  # folded YAML strings and command lists hold whole commands
        for doc in load_docs(path):
            for s in strings(doc):
                problems += reference_problems(s, rel(path))
    report(sorted(set(problems)))


def secret_problems(text: str, where: str) -> list[str]:
    """Tokens must not be written into these files: HF_TOKEN only from a secret or the submitter's shell."""
    problems = []
    if re.search(r"\bhf_[A-Za-z0-9]{20,}", text):
        problems.append(f"{where}: holds what looks like a Hugging Face token")
    for doc in (yaml.safe_load_all(text) if where.endswith(".yaml") else []):
        for env in env_entries(doc):
            if env.get("name") in ("HF_TOKEN", "PEARL_RAY_API_KEY") and "value" in env:
                problems.append(f"{where}: {env['name']} as a literal value; take it from a secret (valueFrom)")
    return problems


def env_entries(value) -> list[dict]:
    """Every container ``env`` entry inside a parsed manifest."""
    if isinstance(value, dict):
        here = [e for e in value.get("env") or [] if isinstance(e, dict)] if isinstance(value.get("env"), list) else []
        return here + [e for v in value.values() for e in env_entries(v)]
    if isinstance(value, list):
        return [e for v in value for e in env_entries(v)]
    return []


@pytest.mark.parametrize("path", sorted(p for p in CLUSTERS.rglob("*") if p.is_file()), ids=rel)
def test_no_secrets_in_the_files(path):
    assert secret_problems(path.read_text(), rel(path)) == []


def test_secret_checker_rejects_literal_tokens():
    job = (CLUSTERS / "kuberay/fetch-models.yaml").read_text()
    broken = job.replace("valueFrom:                    # taken from a secret, not written here\n"
                         "                secretKeyRef: {name: hf-token, key: HF_TOKEN}", "value: abc")
    assert broken != job
    assert any("literal value" in p for p in secret_problems(broken, "x.yaml"))
    assert secret_problems("HF_TOKEN=hf_" + "a1B2" * 8, "README.md")


def test_kuberay_ray_pods_share_one_model_cache():
    """Every Ray pod (and the fetch Job) sees the weights at the same path: one HF_HOME on one volume."""
    homes, docs = set(), [d for p in (CLUSTERS / "kuberay").glob("*.yaml") for d in load_docs(p)]
    for doc in docs:
        if doc.get("kind") in KUBERAY_KINDS + ("Job",):
            entries = env_entries(doc)
            homes |= {e["value"] for e in entries if e.get("name") == "HF_HOME"}
            offline = {e["value"] for e in entries if e.get("name") == "HF_HUB_OFFLINE"}
            assert offline == ({"1"} if doc["kind"] != "Job" else set()), doc["metadata"]["name"]
    assert homes == {"/data/huggingface"}
    (job,) = [d for d in docs if d.get("kind") == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["workingDir"] == "/home/ray/pearl-ray"


@pytest.fixture(scope="module")
def fetch_models():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_models", CLUSTERS / "fetch_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_models_plans_a_download_per_node(fetch_models):
    nodes = [{"NodeID": "head", "Alive": True, "Resources": {"CPU": 0.0}},
             {"NodeID": "gpu1", "Alive": True, "Resources": {"CPU": 192.0, "GPU": 8.0}},
             {"NodeID": "gone", "Alive": False, "Resources": {"GPU": 8.0}},
             {"NodeID": "gpu2", "Alive": True, "Resources": {"CPU": 192.0, "GPU": 8.0}}]
    assert fetch_models.plan(nodes, shared=False) == [("head", False), ("gpu1", True), ("gpu2", True)]
    assert fetch_models.plan(nodes, shared=True) == [("gpu1", True)]
    assert fetch_models.plan(nodes[:1], shared=True) == [("head", True)]
    assert fetch_models.plan([], shared=False) == []
    assert fetch_models.CONFIG_PATTERNS == ["*.json"] and "original/*" in fetch_models.IGNORE_PATTERNS
    args = fetch_models.build_parser().parse_args(["--preset", "a", "--model", "x/y", "--shared", "--dry-run"])
    assert (args.preset, args.model, args.shared, args.dry_run, args.local) == (["a"], ["x/y"], True, True, False)
    assert fetch_models.main(["--dry-run"]) == 2  # nothing named


# --------------------------------------------------------------------------------------------------------------
# tests: each checker fails on a broken copy


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTERS / "aws-p5.yaml").read_text())


def gpu_worker(config: dict) -> dict:
    return next(t for name, t in config["available_node_types"].items() if name != config["head_node_type"])


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c.update(max_worker=3), "ray rejects"),                                   # a typo: schema
    (lambda c: gpu_worker(c)["resources"].update(GPU="8"), "ray rejects"),               # a string count
    (lambda c: c.update(head_node_type="no-such-type"), "ray rejects"),                  # ray's own checks
    (lambda c: gpu_worker(c)["node_config"].clear() or gpu_worker(c).pop("node_config"), "ray rejects"),
    (lambda c: gpu_worker(c)["resources"].pop("GPU"), "no worker node type advertises GPUs"),
    (lambda c: gpu_worker(c).update(min_workers=5), "min_workers"),
    (lambda c: c["file_mounts"].clear(), "file_mounts"),
    (lambda c: c["worker_setup_commands"].pop(), "--no-deps -e"),
    (lambda c: c["worker_setup_commands"].reverse(), "install torch before"),
    (lambda c: c["docker"].update(worker_image="rayproject/ray:2.9.0-gpu"), "docker.worker_image"),
    (lambda c: c["docker"].update(worker_run_options=["-e HF_HOME=/mnt/nvme/hf"]), "one HF_HOME"),
])
def test_launcher_checker_rejects_broken_configs(aws, breakage, expected):
    assert launcher_problems(aws) == []
    broken = copy.deepcopy(aws)
    breakage(broken)
    problems = launcher_problems(broken)
    assert any(expected in p for p in problems), problems


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((CLUSTERS / "kuberay/rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def rayservice():
    return yaml.safe_load((CLUSTERS / "kuberay/rayservice.yaml").read_text())


def first_group(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]


def worker_container(doc: dict) -> dict:
    return first_group(doc)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: d["metadata"].update(name="Pearl_GSM8K"), "metadata.name"),
    (lambda d: d["spec"].pop("rayClusterSpec"), "no Ray cluster spec"),
    (lambda d: cluster_spec(d).update(rayVersion="2.9.0"), "rayVersion"),
    (lambda d: cluster_spec(d)["headGroupSpec"].pop("rayStartParams"), "rayStartParams must be a mapping"),
    (lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "must be a string"),
    (lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), "no image"),
    (lambda d: worker_container(d)["resources"]["limits"].pop("memory"), "resources.limits cpu and memory"),
    (lambda d: first_group(d).pop("groupName"), "no groupName"),
    (lambda d: first_group(d).update(minReplicas=3), "minReplicas <= replicas"),
    (lambda d: first_group(d).pop("maxReplicas"), "integers"),
    (lambda d: worker_container(d)["resources"]["requests"].pop("nvidia.com/gpu"), "both resources.requests"),
    (lambda d: worker_container(d)["resources"]["limits"].update({"nvidia.com/gpu": "4"}), "same positive"),
    (lambda d: [worker_container(d)["resources"][k].pop("nvidia.com/gpu") for k in ("requests", "limits")],
     "no worker group requests nvidia.com/gpu"),
    (lambda d: worker_container(d)["volumeMounts"].append({"name": "nope", "mountPath": "/x"}), "no volume"),
    (lambda d: d["spec"].pop("entrypoint"), "needs an entrypoint"),
    (lambda d: d["spec"].update(entrypoint="cd /home/ray/pearl-ray && python jobs/eval_gsm8k.py"), "&&"),
    (lambda d: d["spec"].update(entrypoint="python jobs/no_such_job.py --limit 1"), "no such file"),
    (lambda d: d["spec"].update(entrypoint="python jobs/eval_gsm8k.py --no-such-flag 1"), "no option --no-such-flag"),
    (lambda d: d["spec"].update(entrypoint="echo hello"), "runs no `python"),
    (lambda d: d["spec"].pop("shutdownAfterJobFinishes"), "shutdownAfterJobFinishes"),
])
def test_kuberay_checker_rejects_broken_rayjobs(rayjob, breakage, expected):
    broken = copy.deepcopy(rayjob)
    breakage(broken)
    problems = kuberay_problems(broken)
    assert any(expected in p for p in problems), problems


def set_serve_config(doc: dict, edit) -> None:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    edit(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d["spec"].pop("serveConfigV2"), "serveConfigV2 must be a string"),
    (lambda d: d["spec"].update(serveConfigV2="applications: [unclosed"), "not YAML"),
    (lambda d: set_serve_config(d, lambda c: c.update(applications=[])), "needs `applications`"),
    (lambda d: set_serve_config(d, lambda c: c["applications"][0].update(import_path="pearl_ray.nope:build_app")),
     "pearl_ray.nope does not import"),
    (lambda d: set_serve_config(d, lambda c: c["applications"][0].update(import_path="pearl_ray.serve:no_app")),
     "defines no no_app"),
    (lambda d: set_serve_config(d, lambda c: c["applications"][0]["args"].update(draf_num_cpus=1)),
     "not a valid ServeConfig"),
    (lambda d: set_serve_config(d, lambda c: c["http_options"].update(host="127.0.0.1")), "0.0.0.0"),
    (lambda d: d["spec"].pop("rayClusterConfig"), "no Ray cluster spec"),
])
def test_kuberay_checker_rejects_broken_rayservices(rayservice, breakage, expected):
    broken = copy.deepcopy(rayservice)
    breakage(broken)
    problems = kuberay_problems(broken)
    assert any(expected in p for p in problems), problems


def test_kuberay_checker_rejects_other_kinds():
    problems = kuberay_problems({"apiVersion": "ray.io/v1", "kind": "RayClusterr", "metadata": {"name": "x"}})
    assert any("kind must be one of" in p for p in problems)


@pytest.mark.parametrize("text, expected", [
    ("python jobs/no_such_job.py --limit 1", "no such file"),
    ("ray job submit -- python jobs/eval_gsm8k.py --limit 3 --lmit 3", "no option --lmit"),
    ("python jobs/eval_gsm8k.py \\\n    --no-such-flag 3", "no option --no-such-flag"),
    ("python -m pearl_ray serve --port 8000 --max-num-seq 4", "no option --max-num-seq"),
    ("python -m pearl_ray.no_such_module", "--help` exits 1"),
    ("python -m pearl_ray.serve", "--help` exits 1"),  # a package without __main__.py
    ("import_path: pearl_ray.serve:build_ap", "defines no build_ap"),
    ("import_path: pearl_ray.nope:build_app", "does not import"),
    ("kubectl apply -f clusters/kuberay/no-such.yaml", "clusters/kuberay/no-such.yaml"),
    ("pip install -r ~/pearl-ray/requirement.txt", "requirement.txt"),
])
def test_reference_checker_rejects_missing_names(text, expected):
    problems = reference_problems(text, "text")
    assert any(expected in p for p in problems), problems


def test_reference_checker_accepts_real_names():
    text = ("python jobs/eval_gsm8k.py --limit 3 --out /tmp/x -- ignored\npython -m pearl_ray serve --port 8000\n"
            "python -m pearl_ray.evals.gsm8k_report results/x\nimport_path: pearl_ray.serve:build_app\n"
            "see clusters/README.md and ~/pearl-ray/requirements.txt\n")
    assert reference_problems(text, "text") == []


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v"]))
