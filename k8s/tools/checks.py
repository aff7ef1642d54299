#!/usr/bin/env python3
"""Manifest checks run by scripts/k8s-validate (needs PyYAML only).

Subcommands:

  crd-schema CRD.yaml VERSION OUT.json
      Extract the openAPIV3Schema of VERSION from a CustomResourceDefinition
      and make it strict: every object schema that lists `properties` gets
      `additionalProperties: false` (unless it says
      x-kubernetes-preserve-unknown-fields), and apiVersion/kind are pinned.
      The result is a JSON Schema for check-jsonschema.

  extract RENDERED.yaml KIND OUTDIR
      Write every object of KIND in a rendered multi-document YAML file to
      OUTDIR/<n>-<name>.json, one instance per file; print the file names.

  services RENDERED.yaml SETTINGS.txt [BINARY_DIR]
      Check each service's Deployment in a rendered overlay against the
      settings the service reads. Every env name set on its container must be
      a setting the service reads (or one of the four AMQP_URL helpers below);
      every setting listed in SETTINGS.txt must be set; settings the service
      reads but the manifest leaves unset are reported (they run at their
      defaults). What the service reads comes from
      `BINARY_DIR/<service> --print-settings` when that binary exists and
      supports the flag, else from SETTINGS.txt. Also: referenced
      ConfigMap/Secret keys exist (those of the operators' Secrets excepted),
      probes are GET /readyz (readiness) and
      GET /healthz (liveness) on the service's port (device-service may use
      GET /readyz/broker for readiness), and the shutdown timings
      fit the grace period.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

# Port each service listens on (LISTEN_ADDR default) and must expose.
SERVICE_PORTS = {"websocket-service": 8080, "device-service": 8081}

# Readiness probe paths each service may use. device-service's /readyz/broker
# follows the broker alone: a PostgreSQL outage must not take every replica out
# of its Service while the relay and the v1 API keep working.
READINESS_PATHS = {"websocket-service": ("/readyz",), "device-service": ("/readyz/broker", "/readyz")}

# Documented exceptions to "every env name is a setting the service reads":
# the RabbitMQ cluster operator's default-user Secret has username, password,
# host and port keys but no URI, so the manifests read those four into helper
# variables and compose AMQP_URL from them with $(VAR) expansion. The
# services never read the helpers themselves.
AMQP_HELPERS = {
    "AMQP_USERNAME": "username",
    "AMQP_PASSWORD": "password",
    "AMQP_HOST": "host",
    "AMQP_PORT": "port",
}

ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def load_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


# ---------------------------------------------------------------- crd-schema


def strictify(node):
    if isinstance(node, dict):
        out = {k: strictify(v) for k, v in node.items()}
        if (
            isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strictify(v) for v in node]
    return node


def cmd_crd_schema(crd_path: str, version: str, out_path: str) -> int:
    docs = [d for d in load_docs(crd_path) if d.get("kind") == "CustomResourceDefinition"]
    if len(docs) != 1:
        print(f"error: {crd_path}: expected one CustomResourceDefinition, found {len(docs)}")
        return 1
    crd = docs[0]
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strictify(v["schema"]["openAPIV3Schema"])
            break
    else:
        print(f"error: {crd_path}: no version {version}")
        return 1
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = f"{kind} {group}/{version} (strict)"
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version}"]}
    props["kind"] = {"type": "string", "enum": [kind]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    Path(out_path).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------- extract


def cmd_extract(rendered: str, kind: str, outdir: str) -> int:
    os.makedirs(outdir, exist_ok=True)
    for i, doc in enumerate(d for d in load_docs(rendered) if d.get("kind") == kind):
        name = doc.get("metadata", {}).get("name", "unnamed")
        path = os.path.join(outdir, f"{i}-{name}.json")
        Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(path)
    return 0


# ------------------------------------------------------------------ services


def read_settings_file(path: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in SERVICE_PORTS or not ENV_NAME.match(parts[1]):
            raise SystemExit(f"error: {path}:{lineno}: expected '<service> <ENV_NAME>', got {raw!r}")
        settings.setdefault(parts[0], []).append(parts[1])
    return settings


def settings_from_binary(binary_dir: str | None, service: str) -> list[str] | None:
    """Names printed by `<service> --print-settings`, or None when unavailable."""
    if not binary_dir:
        return None
    exe = os.path.join(binary_dir, service)
    if not os.access(exe, os.X_OK):
        return None
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        out = subprocess.run(
            [exe, "--print-settings"], capture_output=True, text=True, timeout=5, env=env, stdin=subprocess.DEVNULL
        )
    except (subprocess.TimeoutExpired, OSError) as e:
        print(f"note: {exe} --print-settings did not work ({e.__class__.__name__}); using the settings file")
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names or not all(ENV_NAME.match(n) for n in names):
        print(f"note: {exe} does not support --print-settings (exit {out.returncode}); using the settings file")
        return None
    return names


class Checker:
    def __init__(self, rendered: str):
        self.rendered = rendered
        self.docs = load_docs(rendered)
        self.errors: list[str] = []
        self.notes: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def find(self, kind: str, name: str) -> dict | None:
        for d in self.docs:
            if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
                return d
        return None

    def object_keys(self, kind: str, name: str) -> set[str] | None:
        obj = self.find(kind, name)
        if obj is None:
            return None
        return set(obj.get("data") or {}) | set(obj.get("stringData") or {}) | set(obj.get("binaryData") or {})

    def config_value(self, cm_name: str, key: str) -> str | None:
        cm = self.find("ConfigMap", cm_name)
        return None if cm is None else (cm.get("data") or {}).get(key)

    def env_value(self, env: dict) -> str | None:
        """Literal value of an env entry, resolving configMapKeyRef."""
        if "value" in env:
            return str(env["value"])
        ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
        if ref:
            return self.config_value(ref.get("name", ""), ref.get("key", ""))
        return None

    def operator_secrets(self) -> set[str]:
        """Secrets the operators create: RabbitmqCluster <name>-default-user, and
        CloudNativePG Cluster <name>-app (keys username, password, host, port,
        dbname, uri)."""
        rabbit = {
            f"{d['metadata']['name']}-default-user"
            for d in self.docs
            if d.get("kind") == "RabbitmqCluster" and d.get("metadata", {}).get("name")
        }
        cnpg = {
            f"{d['metadata']['name']}-app"
            for d in self.docs
            if d.get("kind") == "Cluster"
            and str(d.get("apiVersion", "")).startswith("postgresql.cnpg.io/")
            and d.get("metadata", {}).get("name")
        }
        return rabbit | cnpg

    def check_container(
        self, where: str, service: str, pod: dict, c: dict, reads: list[str], required: list[str], source: str
    ) -> None:
        port = SERVICE_PORTS[service]
        env = c.get("env") or []
        names = [e["name"] for e in env]

        # envFrom contributes every key of the referenced ConfigMap/Secret.
        for src in c.get("envFrom") or []:
            for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if field in src:
                    ref = src[field].get("name", "")
                    keys = self.object_keys(kind, ref)
                    if keys is None:
                        self.error(f"{where}: envFrom {kind} {ref!r} is not in the rendered manifests")
                        continue
                    names += [src.get("prefix", "") + k for k in sorted(keys)]

        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            self.error(f"{where}: env names set more than once: {', '.join(dupes)}")
        got = set(names)
        unknown = sorted(got - set(reads) - set(AMQP_HELPERS))
        missing = sorted(set(required) - got)
        defaults = sorted(set(reads) - got)
        if unknown:
            self.error(
                f"{where}: env names that {service} does not read (according to {source}): {', '.join(unknown)}"
            )
            listed_only = sorted(set(unknown) & set(required))
            if listed_only:
                self.error(
                    f"{where}: k8s/settings.txt says {service} reads {', '.join(listed_only)} but {source} does not "
                    f"list it: a variable read outside the config struct (RUST_LOG by the log filter) must still be "
                    f"printed by --print-settings; fix the binary or the list"
                )
        if missing:
            self.error(f"{where}: settings listed in k8s/settings.txt but not set in the manifest: {', '.join(missing)}")
        if defaults:
            self.notes.append(f"{where}: left at the service's defaults: {', '.join(defaults)}")

        # Every referenced key must exist (the operator's Secret excepted).
        operator_secrets = self.operator_secrets()
        for e in env:
            vf = e.get("valueFrom") or {}
            for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = vf.get(field)
                if not ref:
                    continue
                name, key = ref.get("name", ""), ref.get("key", "")
                if kind == "Secret" and name in operator_secrets:
                    continue
                keys = self.object_keys(kind, name)
                if ref.get("optional"):
                    # Optional settings may be left unset on purpose; say so.
                    if keys is not None and key not in keys:
                        self.notes.append(f"{where}: optional {e['name']} is unset ({kind} {name!r} has no key {key!r})")
                elif keys is None:
                    self.error(f"{where}: env {e['name']}: {kind} {name!r} is not in the rendered manifests")
                elif key not in keys:
                    self.error(f"{where}: env {e['name']}: {kind} {name!r} has no key {key!r}")

        # The AMQP_URL helpers: all four, from the operator's Secret, defined
        # before AMQP_URL, and all used by it.
        helpers = [n for n in names if n in AMQP_HELPERS]
        if helpers:
            by_name = {e["name"]: (i, e) for i, e in enumerate(env)}
            url = by_name.get("AMQP_URL")
            if url is None or "value" not in url[1]:
                self.error(f"{where}: AMQP_* helper variables are set but AMQP_URL is not composed from them")
            else:
                url_index, url_env = url
                for helper, key in AMQP_HELPERS.items():
                    if helper not in by_name:
                        self.error(f"{where}: AMQP_URL helper {helper} is missing")
                        continue
                    i, e = by_name[helper]
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                    if ref.get("name") not in operator_secrets or ref.get("key") != key:
                        self.error(
                            f"{where}: {helper} must come from key {key!r} of a RabbitmqCluster's "
                            f"<cluster>-default-user Secret (found {ref or e})"
                        )
                    if i > url_index:
                        self.error(f"{where}: {helper} must be defined before AMQP_URL for $({helper}) to expand")
                    if f"$({helper})" not in url_env["value"]:
                        self.error(f"{where}: AMQP_URL does not use $({helper})")

        # Ports and probes.
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if port not in ports.values():
            self.error(f"{where}: container port {port} is not declared (found {sorted(ports.values())})")

        def probe_port(probe: dict) -> object:
            p = (probe.get("httpGet") or {}).get("port")
            return ports.get(p, p) if isinstance(p, str) else p

        for kind, paths in (("readinessProbe", READINESS_PATHS[service]), ("livenessProbe", ("/healthz",))):
            probe = c.get(kind)
            if not probe or "httpGet" not in probe:
                self.error(f"{where}: {kind} must be an httpGet probe on {paths[0]}")
                continue
            if probe["httpGet"].get("path") not in paths:
                self.error(f"{where}: {kind} path is {probe['httpGet'].get('path')!r}, expected one of {paths!r}")
            if probe_port(probe) != port:
                self.error(f"{where}: {kind} port is {probe['httpGet'].get('port')!r}, expected {port}")
        startup = c.get("startupProbe")
        if startup and (startup.get("httpGet") or {}).get("path") not in ("/healthz", "/readyz"):
            self.error(f"{where}: startupProbe must use /healthz or /readyz")

        listen = next((self.env_value(e) for e in env if e["name"] == "LISTEN_ADDR"), None)
        if listen is not None and not listen.endswith(f":{port}"):
            self.error(f"{where}: LISTEN_ADDR is {listen!r}, but the container port is {port}")

        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/path") != "/metrics":
            self.error(f"{where}: pod template lacks prometheus.io/scrape=true and prometheus.io/path=/metrics")
        elif annotations.get("prometheus.io/port") != str(port):
            self.error(f"{where}: prometheus.io/port is {annotations.get('prometheus.io/port')!r}, expected {port}")

        # Service links inject <SERVICE>_PORT-style variables that could shadow
        # or masquerade as settings (a Service named "amqp" gives AMQP_PORT).
        if pod["spec"].get("enableServiceLinks") is not False:
            self.error(f"{where}: set enableServiceLinks: false so that only the listed env names reach the service")

        # Shutdown: preStop sleep + SHUTDOWN_GRACE_MS < terminationGracePeriodSeconds.
        grace_s = pod["spec"].get("terminationGracePeriodSeconds", 30)
        pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        shutdown_ms = next((self.env_value(e) for e in env if e["name"] == "SHUTDOWN_GRACE_MS"), None)
        try:
            shutdown_s = int(shutdown_ms) / 1000 if shutdown_ms is not None else 10
        except ValueError:
            self.error(f"{where}: SHUTDOWN_GRACE_MS is not an integer: {shutdown_ms!r}")
            shutdown_s = 10
        if pre_stop + shutdown_s >= grace_s:
            self.error(
                f"{where}: preStop {pre_stop}s + SHUTDOWN_GRACE_MS {shutdown_s:g}s does not fit in "
                f"terminationGracePeriodSeconds {grace_s}"
            )

    def check_service_object(self, service: str) -> None:
        port = SERVICE_PORTS[service]
        svc = self.find("Service", service)
        if svc is None:
            self.error(f"Service/{service}: missing")
            return
        if not any(p.get("port") == port for p in svc["spec"].get("ports") or []):
            self.error(f"Service/{service}: does not expose port {port}")

    def check_autoscalers(self) -> None:
        """A Deployment's replicas must lie within its HPA's range, so apply does not fight the HPA."""
        for hpa in (d for d in self.docs if d.get("kind") == "HorizontalPodAutoscaler"):
            ref = hpa["spec"].get("scaleTargetRef", {})
            dep = self.find(ref.get("kind", ""), ref.get("name", ""))
            where = f"HorizontalPodAutoscaler/{hpa['metadata']['name']}"
            if dep is None:
                self.error(f"{where}: target {ref.get('kind')}/{ref.get('name')} is not in the rendered manifests")
                continue
            lo, hi = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
            replicas = dep["spec"].get("replicas", 1)
            if not isinstance(replicas, int) or isinstance(replicas, bool):
                self.error(f"{where}: {ref['name']} has replicas {replicas!r}, not an integer")
            elif not lo <= replicas <= hi:
                self.error(f"{where}: {ref['name']} has replicas {replicas}, outside minReplicas..maxReplicas {lo}..{hi}")

    def run(self, reads: dict[str, tuple[list[str], str]], required: dict[str, list[str]]) -> int:
        for service, (names, source) in reads.items():
            dep = self.find("Deployment", service)
            if dep is None:
                self.error(f"Deployment/{service}: missing")
                continue
            pod = dep["spec"]["template"]
            containers = [c for c in pod["spec"].get("containers", []) if c.get("name") == service]
            if len(containers) != 1:
                self.error(f"Deployment/{service}: expected one container named {service}")
                continue
            self.check_container(
                f"Deployment/{service} container {service}",
                service,
                pod,
                containers[0],
                names,
                required.get(service, []),
                source,
            )
            self.check_service_object(service)
        self.check_autoscalers()
        for n in self.notes:
            print(f"note: {n}")
        for e in self.errors:
            print(f"error: {self.rendered}: {e}")
        return 1 if self.errors else 0


def cmd_services(rendered: str, settings_file: str, binary_dir: str | None) -> int:
    listed = read_settings_file(settings_file)
    reads: dict[str, tuple[list[str], str]] = {}
    for service in SERVICE_PORTS:
        if service not in listed:
            print(f"error: {settings_file} lists no settings for {service}")
            return 1
        from_binary = settings_from_binary(binary_dir, service)
        if from_binary is not None:
            reads[service] = (from_binary, f"{service} --print-settings")
        else:
            reads[service] = (listed[service], "k8s/settings.txt")
    return Checker(rendered).run(reads, listed)


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "crd-schema":
        return cmd_crd_schema(argv[1], argv[2], argv[3])
    if len(argv) == 4 and argv[0] == "extract":
        return cmd_extract(argv[1], argv[2], argv[3])
    if len(argv) in (3, 4) and argv[0] == "services":
        return cmd_services(argv[1], argv[2], argv[3] if len(argv) == 4 else None)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
