"""Loading ServinCRIConfig documents: short and full documents, defaults and normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from servin_shim.config import (
    ServinCRIConfig,
    TcpAddress,
    default_config_text,
    dump_config,
    load_config,
    parse_config,
)
from servin_shim.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]

HEADER = "apiVersion: v1\nkind: ServinCRIConfig\n"

FULL = """\
apiVersion: v1
kind: ServinCRIConfig
metadata: {name: node-7}
spec:
  criSocket: /run/test/cri.sock
  criPort: "127.0.0.1:10010"
  runtime:
    name: crun
    version: "1.8"
    runtimeType: oci
    runtimeRoot: /run/test/crun
    runtimeEngine: /usr/bin/crun
    runtimeHandlers:
      runc: {runtimeEngine: /usr/sbin/runc, runtimeRoot: /run/test/runc, options: {systemdCgroup: false}}
      kata: {runtimeEngine: /opt/kata/bin/kata-runtime}
  imageService: {defaultRegistry: registry.local:5000, pullTimeout: 1h30m, parallelPulls: 8}
  networkPlugin: cni
  cniConfigDir: /etc/test/net.d
  cniBinDir: /opt/cni/bin
  podSandbox: {imageRepository: registry.k8s.io/pause, imageTag: "3.9"}
  securityContext: {runAsUser: 1000, readOnlyRootFilesystem: true, privileged: false}
  container: {defaultRuntime: crun, logDriver: cri, logMaxSize: 1Gi, logMaxFiles: 2}
  image:
    defaultRegistry: registry.local:5000
    registryMirrors:
      docker.io: [http://127.0.0.1:5001, mirror.example]
      quay.io: {endpoints: [https://quay-mirror.example/v2], skipUpstream: true}
    insecureRegistries: [registry.local:5000, "127.0.0.1:5001"]
  network: {plugin: cni, pluginBinDir: /opt/cni/bin, pluginConfDir: /etc/test/net.d}
  security: {apparmor: true, selinux: false, seccomp: false, noNewPrivileges: true}
  resources: {cpuCfsPeriod: 50ms, cpuCfsQuota: 25ms, memorySwap: 512Mi, oomScoreAdj: -500}
"""


def test_short_document_takes_defaults() -> None:
    config = parse_config(HEADER + "spec:\n  imageService: {pullTimeout: 300s}\n", "short.yaml")
    assert config.spec.image_service.pull_timeout == 300.0
    assert config.spec.image_service.parallel_pulls == 3
    assert config.spec.cri_socket == "/run/servin/servin.sock"
    assert config.spec.cri_port is None
    assert config.spec.container.log_max_size == 0
    assert config.spec.resources.cpu_cfs_period == 100_000
    assert config.metadata.name == "default"


def test_header_only_document_equals_defaults() -> None:
    assert parse_config(HEADER, "min.yaml") == ServinCRIConfig()


def test_full_document_loads(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(FULL)
    spec = load_config(path).spec
    assert spec.cri_socket == "/run/test/cri.sock"
    assert spec.cri_port == TcpAddress("127.0.0.1", 10010)
    assert spec.runtime.name == "crun"
    assert spec.runtime.version == "1.8"
    assert spec.runtime.runtime_engine == Path("/usr/bin/crun")
    assert spec.runtime.runtime_root == Path("/run/test/crun")
    assert spec.image_service.pull_timeout == 5400.0
    assert spec.image_service.parallel_pulls == 8
    assert spec.pod_sandbox.infra_image == "registry.k8s.io/pause:3.9"
    assert spec.security_context.run_as_user == 1000
    assert spec.security_context.read_only_root_filesystem is True
    assert spec.container.default_runtime == "crun"
    assert spec.container.log_max_size == 1024**3
    assert spec.container.log_max_files == 2
    assert spec.image.insecure_registries == ["registry.local:5000", "127.0.0.1:5001"]
    assert spec.network.plugin_bin_dir == Path("/opt/cni/bin")
    assert spec.cni_config_dir == Path("/etc/test/net.d")
    assert spec.security.apparmor is True
    assert spec.security.seccomp is False
    assert spec.security.no_new_privileges is True
    assert spec.resources.cpu_cfs_period == 50_000
    assert spec.resources.cpu_cfs_quota == 25_000
    assert spec.resources.memory_swap == 512 * 1024**2
    assert spec.resources.oom_score_adj == -500


def test_full_document_mirrors() -> None:
    mirrors = parse_config(FULL, "full.yaml").spec.image.registry_mirrors
    assert mirrors["docker.io"].endpoints == ["http://127.0.0.1:5001", "https://mirror.example"]
    assert mirrors["docker.io"].skip_upstream is False
    assert mirrors["quay.io"].endpoints == ["https://quay-mirror.example/v2"]
    assert mirrors["quay.io"].skip_upstream is True


def test_full_document_handlers() -> None:
    runtime = parse_config(FULL, "full.yaml").spec.runtime
    assert sorted(runtime.runtime_handlers) == ["crun", "kata", "runc"]
    assert runtime.runtime_handlers["runc"].runtime_root == Path("/run/test/runc")
    assert runtime.runtime_handlers["runc"].options == {"systemdCgroup": False}
    assert runtime.runtime_handlers["kata"].runtime_root == Path("/run/servin/kata")
    assert runtime.runtime_handlers["crun"].runtime_root == Path("/run/test/crun")


def test_snake_case_keys_load() -> None:
    text = HEADER + "spec:\n  image_service: {pull_timeout: 2m}\n"
    assert parse_config(text, "snake.yaml").spec.image_service.pull_timeout == 120.0


def test_mirror_list_belongs_to_default_registry() -> None:
    text = (
        HEADER + "spec:\n  image: {defaultRegistry: quay.io, registryMirrors: [m.example:5000]}\n"
    )
    mirrors = parse_config(text, "m.yaml").spec.image.registry_mirrors
    assert list(mirrors) == ["quay.io"]
    assert mirrors["quay.io"].endpoints == ["https://m.example:5000"]


def test_mirror_list_follows_image_service_registry() -> None:
    text = HEADER + (
        "spec:\n  imageService: {defaultRegistry: quay.io}\n"
        "  image: {registryMirrors: [http://127.0.0.1:5000]}\n"
    )
    image = parse_config(text, "m.yaml").spec.image
    assert image.default_registry == "quay.io"
    assert image.registry_mirrors["quay.io"].endpoints == ["http://127.0.0.1:5000"]


def test_network_spellings_fill_each_other() -> None:
    text = HEADER + "spec:\n  cniBinDir: /opt/cni/bin\n  network: {pluginConfDir: /etc/x}\n"
    spec = parse_config(text, "n.yaml").spec
    assert spec.network.plugin_bin_dir == Path("/opt/cni/bin")
    assert spec.cni_config_dir == Path("/etc/x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", None),
        ("10010", TcpAddress("127.0.0.1", 10010)),
        ("'10010'", TcpAddress("127.0.0.1", 10010)),
        ("'0.0.0.0:10010'", TcpAddress("0.0.0.0", 10010)),
        ("'[::1]:10010'", TcpAddress("::1", 10010)),
        ("null", None),
    ],
)
def test_cri_port_forms(value: str, expected: TcpAddress | None) -> None:
    config = parse_config(HEADER + f"spec: {{criPort: {value}}}\n", "p.yaml")
    assert config.spec.cri_port == expected


def test_unix_scheme_stripped() -> None:
    config = parse_config(HEADER + "spec: {criSocket: 'unix:///run/x.sock'}\n", "s.yaml")
    assert config.spec.cri_socket == "/run/x.sock"


def test_handler_for_empty_uses_default() -> None:
    config = parse_config(HEADER + "spec: {container: {defaultRuntime: crun}}\n", "h.yaml")
    handler = config.spec.handler_for("")
    assert handler.name == "crun"
    assert handler.runtime_engine == Path("/usr/bin/crun")
    assert handler.runtime_root == Path("/run/servin/crun")


def test_handler_for_named() -> None:
    handler = ServinCRIConfig().spec.handler_for("runc")
    assert handler.runtime_engine == Path("/usr/sbin/runc")


def test_handler_for_unknown_raises() -> None:
    with pytest.raises(InvalidArgument, match='unknown runtime handler "kata"'):
        ServinCRIConfig().spec.handler_for("kata")


def test_runtime_section_overrides_builtin() -> None:
    text = HEADER + "spec: {runtime: {runtimeEngine: /opt/runc}}\n"
    runtime = parse_config(text, "r.yaml").spec.runtime
    assert runtime.runtime_handlers["runc"].runtime_engine == Path("/opt/runc")


def test_runtime_name_picks_handler_engine() -> None:
    runtime = parse_config(HEADER + "spec: {runtime: {name: crun}}\n", "r.yaml").spec.runtime
    assert runtime.runtime_engine == Path("/usr/bin/crun")


def test_dump_round_trips_full() -> None:
    config = parse_config(FULL, "full.yaml")
    assert parse_config(dump_config(config), "dumped.yaml") == config


def test_dump_uses_document_spelling() -> None:
    text = dump_config(parse_config(FULL, "full.yaml"))
    assert "pullTimeout: 1h30m" in text
    assert "logMaxSize: 1Gi" in text
    assert "cpuCfsPeriod: 50ms" in text
    assert "criPort: 127.0.0.1:10010" in text


def test_default_yaml_matches_deploy() -> None:
    deploy = (REPO / "deploy" / "cri-config.yaml").read_bytes()
    packaged = (REPO / "servin_shim" / "config" / "default.yaml").read_bytes()
    assert packaged == deploy


def test_default_yaml_is_installed_copy() -> None:
    deploy = (REPO / "deploy" / "cri-config.yaml").read_text(encoding="utf-8")
    assert default_config_text() == deploy


def test_default_yaml_equals_model_defaults() -> None:
    assert parse_config(default_config_text(), "default.yaml") == ServinCRIConfig()


def test_empty_sections_take_defaults() -> None:
    config = parse_config(HEADER + "metadata:\nspec:\n  runtime:\n  image:\n", "empty.yaml")
    assert config == ServinCRIConfig()
