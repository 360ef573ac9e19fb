"""Which CA a manifest means: its `issuer` block, or for a manifest without one (a bare
array) `--issuer` / the step-ca flags > `RECONCILER_*` > `$STEPPATH/config/defaults.json`.

Nothing here guesses: a manifest that names no CA while nothing else does, a choice that
contradicts itself, or a step-ca that lacks a setting is an IssuerConfigError listing
everything to fix, raised before anything is written (docs/step-ca.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from reconciler.defaults import ENV_ISSUER, ENV_ISSUER_SETTINGS, ENVIRON
from reconciler.issuers import IssuerConfigError
from reconciler.issuers.stepca_config import (
    _FLAGS,
    configuration_lines,
    defaults_path,
    read_step_defaults,
    resolve_spec,
    spec_from_options,
)
from reconciler.model import IssuerSpec

TYPES = ("local", "step-ca")
OBJECT_FORM = '{"issuer": {"type": "local"}, "certificates": [...]}'


def choose_issuer(
    manifest_issuer: IssuerSpec | None,
    manifest: Path,
    issuer_flag: str | None,
    flags: Mapping[str, str | Path | None],
    env: Mapping[str, str] = ENVIRON,
) -> IssuerSpec:
    """`flags`: the step-ca flags by setting name (url, root, fingerprint, provisioner,
    password_file), None where not given."""
    env_choice = env.get(ENV_ISSUER) or None
    for name, value in (("--issuer", issuer_flag), (ENV_ISSUER, env_choice)):
        if value is not None and value not in TYPES:
            raise IssuerConfigError(f"{name} is {value!r}", [f"it takes {' or '.join(TYPES)}"])
    if manifest_issuer is not None:
        return _from_manifest(manifest_issuer, manifest, issuer_flag, env)

    given_flags, given_env = _given(flags, env)
    choice, chosen_by = (issuer_flag, "--issuer") if issuer_flag else (env_choice, ENV_ISSUER)
    if choice == "local":
        return _local(chosen_by, given_flags, given_env)
    if choice is None and not given_flags and not given_env and not _has_step_defaults(env):
        raise _no_issuer(manifest, env)
    spec = spec_from_options(
        flags.get("url"),
        flags.get("root"),
        flags.get("fingerprint"),  # type: ignore[arg-type]
        flags.get("provisioner"),
        flags.get("password_file"),
        env,
    )  # type: ignore[arg-type]
    return _complete(spec, bare=True, env=env)


def _given(flags: Mapping[str, str | Path | None], env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The step-ca settings given as flags, and as environment variables, by their names."""
    return [_FLAGS[k] for k, v in flags.items() if v not in (None, "")], [
        ENV_ISSUER_SETTINGS[k] for k in ENV_ISSUER_SETTINGS if env.get(ENV_ISSUER_SETTINGS[k])
    ]


def _from_manifest(spec: IssuerSpec, manifest: Path, issuer_flag: str | None, env: Mapping[str, str]) -> IssuerSpec:
    """An object manifest's issuer block decides; --issuer may only agree with it."""
    if issuer_flag and issuer_flag != spec.type:
        raise IssuerConfigError(
            f"--issuer {issuer_flag} contradicts the issuer of {manifest} ({{\"type\": \"{spec.type}\"}}); "
            "nothing was done",
            ["--issuer only chooses for manifests without an issuer block: drop it, or change the manifest's issuer"],
        )
    return _complete(resolve_spec(spec, env), bare=False, env=env)


def _local(chosen_by: str, given_flags: list[str], given_env: list[str]) -> IssuerSpec:
    """The embedded CA, chosen by `chosen_by`; a step-ca setting given at the same or a
    stronger level than the choice contradicts it."""
    clash = given_flags if chosen_by == "--issuer" else given_flags + given_env
    if clash:
        said = "--issuer local" if chosen_by == "--issuer" else f"{ENV_ISSUER}=local"
        raise IssuerConfigError(
            f"{said} chooses the embedded CA, but {', '.join(clash)} configure{'s' if len(clash) == 1 else ''} "
            "a step-ca; nothing was done",
            ["say which CA you mean: drop those step-ca settings, or drop the local choice"],
        )
    return IssuerSpec(type="local", sources=(("type", chosen_by),))


def _no_issuer(manifest: Path, env: Mapping[str, str]) -> IssuerConfigError:
    return IssuerConfigError(
        f"no issuer configured for {manifest}: a bare array names no CA, and no flag, environment "
        f"variable or {defaults_path(env)} names one; nothing was done",
        [
            "To issue from a step-ca, give each of these (a flag wins over its variable, which wins over defaults.json;"
            " `step ca bootstrap --ca-url URL --fingerprint FP` writes ca-url and fingerprint there):",
            *(f"  {line}" for line in configuration_lines(None, bare=True, env=env)),
            f"To issue from the embedded CA on purpose: --issuer local (or {ENV_ISSUER}=local), "
            f"or write the manifest as {OBJECT_FORM}.",
        ],
    )


def _has_step_defaults(env: Mapping[str, str]) -> bool:
    """defaults.json names a CA (`step ca bootstrap` writes ca-url and fingerprint)."""
    defaults = read_step_defaults(env)
    return any(isinstance(defaults.get(k), str) and defaults[k].strip() for k in ("ca-url", "fingerprint", "root"))


def _complete(spec: IssuerSpec, bare: bool, env: Mapping[str, str]) -> IssuerSpec:
    if spec.type != "step-ca":
        return spec
    lines = configuration_lines(spec, bare, env)
    if lines:
        n = len(lines)
        raise IssuerConfigError(
            f"the step-ca issuer is not fully configured ({n} setting{'s' if n != 1 else ''} to fix); "
            "nothing was done:",
            lines,
        )
    return spec
