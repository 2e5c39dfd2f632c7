#!/usr/bin/env python3
"""Checks that the Dockerfiles, compose file and Kubernetes manifests fit what
the build produces, without a Docker engine (none runs on these machines).

For the root Dockerfile it follows every COPY: a source from the build
context must exist and survive .dockerignore; a source from a build stage is
mapped to the artifact the local build makes (`make static plugins`): the
host stage's CARGO_TARGET_DIR to ours, a stage's WORKDIR to the repository.
It then assembles the runtime image's files in a temporary directory, the
way the COPY lines lay them out, and runs the image's `execd check` on the
config the image ships, with the image's ENV. The app images of
examples/php-app/ are assembled on top of that (their `COPY --from=` the
execd image) and checked with the environment each compose service and each
Kubernetes Deployment gives them, the ConfigMap mounted where the
Deployment mounts it.

So a renamed binary, a plugin that no longer builds, a config that names a
plugin the image does not ship, a COPY hidden by .dockerignore, a probe on a
port the container does not name, or a KEDA trigger on a queue nobody
consumes fails here instead of in a registry push.

Usage: scripts/check-delivery.py   (the Makefile's `docker-check` builds
what it needs first; CARGO_TARGET_DIR as in the Makefile)
"""

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/execd/target"))
EXECD_IMAGE = "registry.private.local/execd"
APP_IMAGE = "registry.private.local/php-app"
# Files a stage makes and another stage uses within the same build; there is
# nothing local to compare them with.
MADE_IN_BUILD = {("planner", "/src/recipe.json")}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}", file=sys.stderr)


def ok(msg):
    print(f"ok   {msg}")


# ---- Dockerfile parsing ------------------------------------------------------


class Stage:
    def __init__(self, name, base, parent):
        self.name = name
        self.base = base
        # A stage built FROM another stage inherits its ENV and WORKDIR.
        self.env = dict(parent.env) if parent else {}
        self.workdir = parent.workdir if parent else "/"
        self.copies = []  # (from_stage or None, [sources], dest, workdir)
        self.removed = []  # absolute paths a RUN removes with `rm`
        self.instructions = []  # (keyword, args)


def instructions(path):
    """(keyword, argument text) per instruction, continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def parse_dockerfile(path):
    stages = {}
    order = []
    args = {}
    current = None
    for keyword, text in instructions(path):
        if keyword == "ARG" and current is None:
            name, _, default = text.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = [w for w in text.split() if not w.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(order))
            current = Stage(name, base, stages.get(base))
            stages[name] = current
            order.append(current)
        elif current is None:
            continue
        else:
            current.instructions.append((keyword, text))
            if keyword == "WORKDIR":
                current.workdir = os.path.join(current.workdir, text)
            elif keyword == "ENV":
                for item in shlex.split(text):
                    key, _, value = item.partition("=")
                    current.env[key] = value
            elif keyword in ("COPY", "ADD"):
                words = shlex.split(text)
                flags = [w for w in words if w.startswith("--")]
                paths = [w for w in words if not w.startswith("--")]
                src_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
                current.copies.append((src_stage, paths[:-1], paths[-1], current.workdir))
            elif keyword == "RUN":
                for command in re.split(r"&&|;", text):
                    words = shlex.split(command)
                    if words and words[0] == "rm":
                        current.removed += [
                            os.path.join(current.workdir, w) for w in words[1:] if not w.startswith("-")
                        ]
    return stages, order


def dest_path(dest, workdir, src):
    """Where `COPY src dest` puts src, as Docker does: into dest when dest
    ends with / (a directory's contents, a file by its name)."""
    dest = os.path.join(workdir, dest)
    if dest.endswith("/") and not src.endswith("/"):
        return os.path.join(dest, os.path.basename(src.rstrip("/")))
    return dest


# ---- .dockerignore -----------------------------------------------------------


def dockerignore(context):
    f = context / ".dockerignore"
    if not f.exists():
        return []
    rules = []
    for line in f.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rules.append((negate, pattern))
    return rules


def ignored(rules, rel):
    """Docker's rule: the last pattern that matches the path or one of its
    parent directories decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negate, pattern in rules:
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            verdict = not negate
    return verdict


def context_files(context, src):
    path = context / src
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    return [path] if path.exists() else []


# ---- assembling an image's files ---------------------------------------------


def place(root, container_path, local):
    """Puts `local` (a file, or a directory's files) at container_path under
    root. Files are copied, so a config's relative paths resolve inside the
    assembled image and not back in the repository; only big binaries are
    symlinked."""
    target = root / container_path.lstrip("/")
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    for f in files:
        t = target if local.is_file() else target / f.relative_to(local)
        t.parent.mkdir(parents=True, exist_ok=True)
        if t.exists() or t.is_symlink():
            t.unlink()
        if f.stat().st_size > 4 << 20:
            t.symlink_to(f.resolve())
        else:
            shutil.copy2(f, t)


def local_artifact(stage, path):
    """The local file a path inside a build stage corresponds to."""
    target = stage.env.get("CARGO_TARGET_DIR")
    if target and (path + "/").startswith(target.rstrip("/") + "/"):
        return TARGET_DIR / os.path.relpath(path, target)
    if (path + "/").startswith(stage.workdir.rstrip("/") + "/"):
        return REPO / os.path.relpath(path, stage.workdir)
    return None


def check_root_dockerfile(tmp):
    dockerfile = REPO / "Dockerfile"
    stages, order = parse_dockerfile(dockerfile)
    rules = dockerignore(REPO)
    runtime = order[-1]
    root = tmp / "execd-image"
    for stage in order:
        for src_stage, sources, dest, workdir in stage.copies:
            for src in sources:
                where = f"Dockerfile stage {stage.name}: COPY {'--from=' + src_stage + ' ' if src_stage else ''}{src}"
                if src_stage is None:
                    files = context_files(REPO, src)
                    if not files:
                        fail(f"{where}: {src} is not in the repository")
                        continue
                    # .dockerignore may thin a directory out (plugins/dist/
                    # is built in the image), but not hide a source whole.
                    hidden = [f for f in files if ignored(rules, str(f.relative_to(REPO)))]
                    if len(hidden) == len(files):
                        fail(f"{where}: .dockerignore hides it from the build context")
                        continue
                    if stage is runtime:
                        place(root, dest_path(dest, workdir, src), REPO / src)
                    left_out = f" ({len(hidden)} file(s) left out by .dockerignore)" if hidden else ""
                    ok(f"{where}: in the build context{left_out}")
                    continue
                if (src_stage, src) in MADE_IN_BUILD:
                    ok(f"{where}: made inside the build")
                    continue
                from_stage = stages.get(src_stage)
                local = from_stage and local_artifact(from_stage, src)
                if local is None or not local.exists():
                    fail(f"{where}: the local build has no {local or src} (run `make static plugins`)")
                    continue
                if local.is_dir():
                    removed = {Path(local_artifact(from_stage, r)) for r in from_stage.removed}
                    for r in removed:
                        if r.parent == local and not r.exists():
                            fail(f"{where}: the stage removes {r.name}, which the build does not make (the RUN would fail)")
                    shipped = [f for f in sorted(local.iterdir()) if f.is_file() and f not in removed]
                    if not shipped:
                        fail(f"{where}: {local} holds nothing to ship")
                        continue
                    if stage is runtime:
                        for f in shipped:
                            place(root, os.path.join(dest_path(dest, workdir, src), f.name), f)
                    ok(f"{where} -> {local}: {', '.join(f.name for f in shipped)}")
                else:
                    if stage is runtime:
                        place(root, dest_path(dest, workdir, src), local)
                    ok(f"{where} -> {local}")

    check_host_inputs(stages)
    check_ports(dockerfile, runtime)
    return root, runtime


def stage_copies(stage):
    """covered(rel): whether a stage copies repository path `rel`."""
    copied = [os.path.normpath(os.path.join(w, s)) for f, srcs, _, w in stage.copies if f is None for s in srcs]

    def covered(rel):
        p = os.path.normpath(os.path.join(stage.workdir, rel))
        return any(p == c or p.startswith(c + "/") for c in copied)

    return covered


def check_host_inputs(stages):
    """The planner and host stages must copy every workspace member (cargo
    loads the whole workspace), and the host stage every file outside them
    that a member's src/ or build.rs compiles in (include_str!,
    include_bytes!, bindgen! paths)."""
    cargo = (REPO / "Cargo.toml").read_text()
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", cargo)
    members = re.findall(r'"([^"]+)"', members.group(1) if members else "")
    for name in ("planner", "host"):
        covered = stage_copies(stages[name])
        for member in members:
            if covered(member):
                ok(f"Dockerfile stage {name}: copies workspace member {member}")
            else:
                fail(f"Dockerfile stage {name}: workspace member {member} is not copied")
    covered = stage_copies(stages["host"])
    for member in members:
        crate = REPO / member
        for rs in sorted([*(crate / "src").rglob("*.rs"), *crate.glob("build.rs")]):
            text = rs.read_text()
            needed = [rs.parent / p for p in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text)]
            # bindgen!'s `path:` is relative to the crate's manifest.
            for block in re.findall(r"bindgen!\(\{(.*?)\}\)", text, re.S):
                needed += [crate / p for p in re.findall(r'path:\s*"([^"]+)"', block)]
            for n in needed:
                rel = os.path.relpath(os.path.normpath(n), REPO)
                if covered(rel):
                    ok(f"Dockerfile stage host: copies {rel} ({rs.relative_to(REPO)} compiles it in)")
                else:
                    fail(f"Dockerfile stage host: {rs.relative_to(REPO)} compiles in {rel}, which is not copied")


def check_ports(dockerfile, stage):
    exposed = set()
    for keyword, text in stage.instructions:
        if keyword == "EXPOSE":
            exposed |= {p.split("/")[0] for p in text.split()}
    health = [t for k, t in stage.instructions if k == "HEALTHCHECK"]
    if not health:
        fail(f"{dockerfile.relative_to(REPO)}: no HEALTHCHECK")
    if not any(k == "USER" and not t.startswith(("root", "0")) for k, t in stage.instructions):
        fail(f"{dockerfile.relative_to(REPO)}: the final stage has no non-root USER")
    for h in health:
        port = re.search(r"127\.0\.0\.1:(\d+)", h)
        if port and port.group(1) in exposed:
            ok(f"{dockerfile.relative_to(REPO)}: HEALTHCHECK port {port.group(1)} is EXPOSEd")
        else:
            fail(f"{dockerfile.relative_to(REPO)}: HEALTHCHECK {h!r} does not call an EXPOSEd port on 127.0.0.1")


def assemble_app(dockerfile, execd_root, tmp):
    """The files of an examples/php-app image: its `COPY --from=` the execd
    image taken from the assembled execd image, the rest from its context."""
    stages, order = parse_dockerfile(dockerfile)
    final = order[-1]
    context = dockerfile.parent
    root = tmp / f"app-{dockerfile.name}"
    for src_stage, sources, dest, workdir in final.copies:
        for src in sources:
            where = f"{dockerfile.relative_to(REPO)}: COPY {'--from=' + src_stage + ' ' if src_stage else ''}{src}"
            if src_stage is not None:
                base = stages[src_stage].base if src_stage in stages else src_stage
                if not base.startswith(EXECD_IMAGE + ":"):
                    fail(f"{where}: expected a stage FROM {EXECD_IMAGE}:<tag>, found {base}")
                    continue
                local = execd_root / src.lstrip("/")
                if not local.exists():
                    fail(f"{where}: the execd image (root Dockerfile) has no {src}")
                    continue
            else:
                local = context / src
                if not local.exists():
                    fail(f"{where}: {local.relative_to(REPO)} does not exist")
                    continue
            place(root, dest_path(dest, workdir, src), local)
            ok(f"{where}: present")
    check_ports(dockerfile, final)
    return root, final


# ---- running the image's `execd check` ---------------------------------------

EXECD = "/usr/local/bin/execd"


def interpolate(value):
    """Compose-style ${VAR:-default} / ${VAR:?err} / ${VAR}: defaults are
    used, anything required gets a stand-in."""

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        return arg if op == ":-" else f"stand-in-{name.lower()}"

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, str(value))


def execd_check(what, root, env, mounts=None):
    """Runs the assembled image's execd on its config: `execd check`, with
    the image's ENV plus `env`; container paths are rewritten under root."""
    if mounts:
        base = root
        root = Path(tempfile.mkdtemp(dir=base.parent, prefix=base.name + "-"))
        shutil.copytree(base, root, symlinks=True, dirs_exist_ok=True)
        for mount_path, files in mounts.items():
            d = root / mount_path.lstrip("/")
            shutil.rmtree(d, ignore_errors=True)  # a volume hides what the image had there
            d.mkdir(parents=True)
            for name, text in files.items():
                (d / name).write_text(text)
    full = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent"}
    for key, value in env.items():
        full[key] = str(root) + value if value.startswith("/") else value
    config = full.get("EXECD_CONFIG")
    if not config:
        fail(f"{what}: no EXECD_CONFIG")
        return
    binary = root / EXECD.lstrip("/")
    r = subprocess.run([str(binary), "check"], env=full, capture_output=True, text=True)
    if r.returncode == 0:
        ok(f"{what}: execd check {os.path.relpath(config, root)}")
    else:
        fail(f"{what}: execd check {os.path.relpath(config, root)} exits {r.returncode}:\n{r.stdout}{r.stderr}")


# ---- compose and Kubernetes --------------------------------------------------


def check_compose(app_roots):
    path = REPO / "examples/compose/docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    for name, svc in compose["services"].items():
        image = str(svc.get("image", ""))
        if not image.startswith(APP_IMAGE + ":"):
            continue
        build = svc.get("build", {})
        context = (path.parent / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.exists():
            fail(f"{path.relative_to(REPO)}: service {name} builds {dockerfile}, which does not exist")
            continue
        env = svc.get("environment", {})
        # Check the service against both app images: compose can build either.
        for df, (root, final) in app_roots.items():
            execd_check(f"compose service {name} on {df.name}", root,
                        {**final.env, **{k: interpolate(v) for k, v in env.items()}})


def check_k8s(app_roots):
    docs = []
    for f in sorted((REPO / "deploy/k8s").glob("*.yaml")):
        if f.name != "kustomization.yaml":
            docs += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d]
    # secret.example.yaml: the keys the manifests may reference, with stand-ins.
    secrets = {(d["metadata"]["name"], k): v for _, d in docs if d["kind"] == "Secret"
               for k, v in d.get("stringData", {}).items()}
    by_kind = {}
    for f, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = (f, d)
    configmaps = {n: d.get("data", {}) for n, (_, d) in by_kind.get("ConfigMap", {}).items()}
    root, final = app_roots[REPO / "examples/php-app/Dockerfile"]
    consumed = set()
    for name, (f, dep) in by_kind.get("Deployment", {}).items():
        where = f"{f.relative_to(REPO)}: Deployment {name}"
        pod = dep["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        if dep["spec"]["selector"]["matchLabels"].items() - labels.items():
            fail(f"{where}: the selector does not match the pod labels")
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for c in pod["spec"]["containers"]:
            if not c["image"].startswith(APP_IMAGE + ":"):
                continue
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = c.get(probe, {}).get("httpGet")
                if not get:
                    continue
                if get["port"] not in ports and get["port"] not in ports.values():
                    fail(f"{where}: {probe} on port {get['port']}, which the container does not declare")
                else:
                    ok(f"{where}: {probe} {get['path']} on port {get['port']}")
            env = {}
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and (ref["name"], ref["key"]) not in secrets:
                    fail(f"{where}: env {e['name']} reads Secret {ref['name']} key {ref['key']}, "
                         "which deploy/k8s/secret.example.yaml does not show")
                env[e["name"]] = secrets.get((ref["name"], ref["key"]), "") if ref else e["value"]
            mounts = {}
            for m in c.get("volumeMounts", []):
                cm = volumes.get(m["name"], {}).get("configMap")
                if cm:
                    if cm["name"] not in configmaps:
                        fail(f"{where}: mounts ConfigMap {cm['name']}, which deploy/k8s does not define")
                        continue
                    mounts[m["mountPath"]] = configmaps[cm["name"]]
            execd_check(where, root, {**final.env, **env}, mounts)
            # The kubelet probes the pod IP: an admin listener on loopback
            # (execd's default) would never answer and the pod never be ready.
            probed = any(c.get(p, {}).get("httpGet", {}).get("port") in ("admin", 9090)
                         for p in ("livenessProbe", "readinessProbe", "startupProbe"))
            config_path = {**final.env, **env}.get("EXECD_CONFIG", "")
            mount_dir, _, config_name = config_path.rpartition("/")
            text = mounts.get(mount_dir, {}).get(config_name)
            if probed and text is not None:
                admin = str((yaml.safe_load(text) or {}).get("admin", "127.0.0.1:9090"))
                if admin.startswith(("127.", "localhost", "[::1]")) or admin == "off":
                    fail(f"{where}: probes the admin port, but {config_name} has admin {admin!r}, "
                         "which the kubelet cannot reach (set admin: 0.0.0.0:9090)")
                else:
                    ok(f"{where}: admin listener on {admin}, reachable by the probes")
    for text in (t for data in configmaps.values() for t in data.values()):
        for consumer in (yaml.safe_load(text) or {}).get("amqp", {}).get("consumers", []):
            consumed.add(consumer["queue"])
    for name, (f, svc) in by_kind.get("Service", {}).items():
        targets = [d for _, d in by_kind.get("Deployment", {}).values()
                   if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if not targets:
            fail(f"{f.relative_to(REPO)}: Service {name} selects no Deployment")
        else:
            ok(f"{f.relative_to(REPO)}: Service {name} selects {targets[0]['metadata']['name']}")
    for name, (f, so) in by_kind.get("ScaledObject", {}).items():
        where = f"{f.relative_to(REPO)}: ScaledObject {name}"
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in by_kind.get("Deployment", {}):
            fail(f"{where}: scales Deployment {target}, which deploy/k8s does not define")
        for t in so["spec"]["triggers"]:
            queue = t["metadata"].get("queueName")
            if t["type"] == "rabbitmq" and queue not in consumed:
                fail(f"{where}: scales on queue {queue}, which no consumer in the ConfigMaps consumes ({sorted(consumed)})")
            else:
                ok(f"{where}: scales {target} on queue {queue}")
            auth = t.get("authenticationRef", {}).get("name")
            if auth and auth not in by_kind.get("TriggerAuthentication", {}):
                fail(f"{where}: authenticationRef {auth} is not defined")
    for name, (f, ta) in by_kind.get("TriggerAuthentication", {}).items():
        for ref in ta["spec"].get("secretTargetRef", []):
            if (ref["name"], ref["key"]) not in secrets:
                fail(f"{f.relative_to(REPO)}: TriggerAuthentication {name} reads Secret {ref['name']} "
                     f"key {ref['key']}, which deploy/k8s/secret.example.yaml does not show")
    kustomization = REPO / "deploy/k8s/kustomization.yaml"
    if kustomization.exists():
        listed = set(yaml.safe_load(kustomization.read_text()).get("resources", []))
        present = {f.name for f in (REPO / "deploy/k8s").glob("*.yaml")
                   if not f.name.endswith(".example.yaml")} - {"kustomization.yaml"}
        if present - listed:
            fail(f"{kustomization.relative_to(REPO)}: does not list {sorted(present - listed)}")
        if listed - present:
            fail(f"{kustomization.relative_to(REPO)}: lists missing {sorted(listed - present)}")


def main():
    with tempfile.TemporaryDirectory(prefix="execd-delivery-") as t:
        tmp = Path(t)
        execd_root, runtime = check_root_dockerfile(tmp)
        if not failures:
            execd_check("execd image (Dockerfile)", execd_root, runtime.env)
            app_roots = {df: assemble_app(df, execd_root, tmp)
                         for df in sorted((REPO / "examples/php-app").glob("Dockerfile*"))}
            if not failures:
                check_compose(app_roots)
                check_k8s(app_roots)
    if failures:
        print(f"\n{len(failures)} delivery check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("delivery checks passed")


if __name__ == "__main__":
    main()
