"""Invalid documents: each raises one ConfigError naming file, key path, value and expected form."""

from __future__ import annotations

from pathlib import Path

import pytest

from servin_shim.config import ConfigError, load_config, parse_config
from servin_shim.errors import InvalidArgument

HEADER = "apiVersion: v1\nkind: ServinCRIConfig\n"


def load_text(tmp_path: Path, text: str) -> ConfigError:
    """Write text to a config file, load it and return the ConfigError it raises."""
    path = tmp_path / "cri.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_config_error_is_invalid_argument() -> None:
    assert issubclass(ConfigError, InvalidArgument)


def test_bad_duration_message(tmp_path: Path) -> None:
    error = load_text(tmp_path, HEADER + "spec:\n  imageService: {pullTimeout: 5 minutes}\n")
    expected = (
        f'{tmp_path / "cri.yaml"}: spec.imageService.pullTimeout: invalid duration "5 minutes": '
        "expected a number with a unit such as 300s, 15m or 1h"
    )
    assert str(error) == expected


# (document body after the header, key path, shown value, expected form)
BAD_DOCUMENTS = [
    pytest.param(
        "spec:\n  imageServce: {}\n",
        "spec.imageServce",
        '"imageServce"',
        "expected one of criSocket, criPort, runtime, imageService",
        id="unknown-key",
    ),
    pytest.param(
        "spec:\n  runtime:\n    runtimeHandlers:\n      runc: {engine: /x}\n",
        "spec.runtime.runtimeHandlers.runc.engine",
        '"engine"',
        "expected one of runtimeEngine, runtimeRoot, runtimeType, options",
        id="unknown-handler-key",
    ),
    pytest.param(
        "spec:\n  imageService: {parallelPulls: three}\n",
        "spec.imageService.parallelPulls",
        '"three"',
        "expected an integer",
        id="wrong-type-int",
    ),
    pytest.param(
        "spec:\n  imageService: {parallelPulls: true}\n",
        "spec.imageService.parallelPulls",
        "true",
        "expected an integer",
        id="wrong-type-bool-for-int",
    ),
    pytest.param(
        "spec:\n  security: {seccomp: 'on'}\n",
        "spec.security.seccomp",
        '"on"',
        "expected true or false",
        id="wrong-type-bool",
    ),
    pytest.param(
        "spec:\n  runtime: {version: 1.8}\n",
        "spec.runtime.version",
        "1.8",
        "expected a string",
        id="wrong-type-string",
    ),
    pytest.param(
        "spec:\n  container: {logMaxSize: 10 megs}\n",
        "spec.container.logMaxSize",
        '"10 megs"',
        "expected a whole number of bytes or a number with a unit such as 512Ki, 10MB or 1Gi",
        id="bad-size",
    ),
    pytest.param(
        "spec:\n  imageService: {parallelPulls: 0}\n",
        "spec.imageService.parallelPulls",
        "0",
        "expected a value >= 1",
        id="below-minimum",
    ),
    pytest.param(
        "spec:\n  networkPlugin: calico\n",
        "spec.networkPlugin",
        '"calico"',
        "expected cni or none",
        id="bad-choice",
    ),
    pytest.param(
        "spec:\n  cniBinDir: opt/cni\n",
        "spec.cniBinDir",
        '"opt/cni"',
        "expected an absolute path",
        id="relative-path",
    ),
    pytest.param(
        "spec:\n  criPort: 70000\n",
        "spec.criPort",
        "70000",
        "with a port from 1 to 65535",
        id="bad-port",
    ),
    pytest.param(
        "spec:\n  criPort: 'example.com:10010'\n",
        "spec.criPort",
        '"example.com:10010"',
        "with an IP address",
        id="port-hostname",
    ),
    pytest.param(
        "spec:\n  resources: {cpuCfsPeriod: 100000}\n",
        "spec.resources.cpuCfsPeriod",
        '"27h46m40s"',
        "expected a duration from 1ms to 1s",
        id="cfs-period-range",
    ),
    pytest.param(
        "spec:\n  resources: {oomScoreAdj: -1001}\n",
        "spec.resources.oomScoreAdj",
        "-1001",
        "expected a value >= -1000",
        id="oom-range",
    ),
    pytest.param(
        "spec:\n  image: {insecureRegistries: ['http://127.0.0.1:5000']}\n",
        "spec.image.insecureRegistries[0]",
        '"http://127.0.0.1:5000"',
        "without a scheme or path",
        id="insecure-with-scheme",
    ),
    pytest.param(
        "spec:\n  image:\n    registryMirrors: {docker.io: ['ftp://m']}\n",
        'spec.image.registryMirrors["docker.io"].endpoints[0]',
        '"ftp://m"',
        "expected a URL such as https://mirror.example",
        id="bad-mirror-scheme",
    ),
    pytest.param(
        "spec:\n  image:\n    registryMirrors: {docker.io: {skipUpstream: true}}\n",
        'spec.image.registryMirrors["docker.io"].skipUpstream',
        "true",
        "expected at least one endpoint",
        id="skip-upstream-without-mirror",
    ),
    pytest.param(
        "spec:\n  container: {defaultRuntime: kata}\n",
        "spec.container.defaultRuntime",
        '"kata"',
        "expected one of crun, runc",
        id="undefined-default-runtime",
    ),
    pytest.param(
        "spec:\n  runtime:\n    runtimeHandlers: {kata: {runtimeRoot: /run/kata}}\n",
        "spec.runtime.runtimeHandlers.kata.runtimeEngine",
        '"kata"',
        "expected the absolute path of an OCI runtime binary",
        id="handler-without-engine",
    ),
    pytest.param(
        "spec:\n  runtime:\n    runtimeEngine: /opt/runc\n"
        "    runtimeHandlers: {runc: {runtimeEngine: /usr/sbin/runc}}\n",
        "spec.runtime.runtimeHandlers.runc.runtimeEngine",
        '"/usr/sbin/runc"',
        'expected the same value as spec.runtime.runtimeEngine ("/opt/runc")',
        id="handler-conflict",
    ),
    pytest.param(
        "spec:\n  networkPlugin: cni\n  network: {plugin: none}\n",
        "spec.network.plugin",
        '"none"',
        'expected the same value as spec.networkPlugin ("cni")',
        id="paired-key-conflict",
    ),
    pytest.param(
        "spec:\n  podSandbox: {imageTag: '3.9'}\n",
        "spec.podSandbox.imageRepository",
        '"3.9"',
        "expected both keys",
        id="tag-without-repository",
    ),
    pytest.param(
        "spec: [1, 2]\n",
        "spec",
        "[1, 2]",
        "expected a mapping",
        id="section-not-mapping",
    ),
]


@pytest.mark.parametrize(("body", "key_path", "value", "expected"), BAD_DOCUMENTS)
def test_bad_document_message(
    tmp_path: Path, body: str, key_path: str, value: str, expected: str
) -> None:
    message = str(load_text(tmp_path, HEADER + body))
    assert message.startswith(f"{tmp_path / 'cri.yaml'}: {key_path}: ")
    assert value in message
    assert expected in message


def test_bad_kind(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, "apiVersion: v1\nkind: CRIConfig\n"))
    assert message.startswith(f"{tmp_path / 'cri.yaml'}: kind: ")
    assert '"CRIConfig"' in message
    assert "expected ServinCRIConfig" in message


def test_bad_api_version(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, "apiVersion: v1alpha2\nkind: ServinCRIConfig\n"))
    assert message.startswith(f"{tmp_path / 'cri.yaml'}: apiVersion: ")
    assert '"v1alpha2"' in message
    assert "expected v1" in message


def test_missing_kind(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, "apiVersion: v1\nspec: {}\n"))
    assert (
        message == f"{tmp_path / 'cri.yaml'}: kind: missing required key: expected ServinCRIConfig"
    )


def test_yaml_syntax_error(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, HEADER + "spec:\n  criSocket: [unclosed\n  criPort: 1\n"))
    assert message.startswith(f"{tmp_path / 'cri.yaml'}: line ")
    assert "column" in message
    assert "invalid YAML" in message


def test_yaml_error_line_and_column(tmp_path: Path) -> None:
    # The second colon of "  criSocket: a: b" sits on line 4, column 15.
    message = str(load_text(tmp_path, HEADER + "spec:\n  criSocket: a: b\n"))
    assert "line 4, column 15" in message


def test_duplicate_key(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, HEADER + "spec:\n  criPort: 1\n  criPort: 2\n"))
    assert 'duplicate key "criPort"' in message
    assert "line 5, column 3" in message


def test_empty_file(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, ""))
    assert "empty config document" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read config file: no such file")


def test_several_errors_one_exception(tmp_path: Path) -> None:
    body = "spec:\n  imageService: {pullTimeout: soon}\n  container: {logMaxFiles: many}\n"
    error = load_text(tmp_path, HEADER + body)
    assert len(error.problems) == 2
    assert str(error).splitlines() == error.problems
    assert "spec.imageService.pullTimeout" in error.problems[0]
    assert "spec.container.logMaxFiles" in error.problems[1]


def test_source_name_in_parse() -> None:
    with pytest.raises(ConfigError, match=r"^inline: spec\.criSocket: "):
        parse_config(HEADER + "spec: {criSocket: 5}\n", "inline")


def test_null_list_message(tmp_path: Path) -> None:
    message = str(load_text(tmp_path, HEADER + "spec:\n  image: {insecureRegistries: }\n"))
    expected = f"{tmp_path / 'cri.yaml'}: spec.image.insecureRegistries: missing value (null)"
    assert message.startswith(expected)
    assert "expected a list" in message
