"""The command-line tools' XLA flag defaults: added when unset, never overriding the user's."""

from simmim_jax import xla_flags


def test_defaults_added_to_empty_flags():
  assert xla_flags.with_defaults("") == " ".join(xla_flags.CPU_DEFAULTS)


def test_user_value_wins_and_other_flags_are_kept():
  user = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
  assert xla_flags.with_defaults(user) == user


def test_defaults_appended_after_user_flags_and_idempotent():
  once = xla_flags.with_defaults("--xla_force_host_platform_device_count=8")
  assert once.split() == ["--xla_force_host_platform_device_count=8", *xla_flags.CPU_DEFAULTS]
  assert xla_flags.with_defaults(once) == once


def test_apply_defaults_edits_the_given_environment_only():
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  value = xla_flags.apply_defaults(environ)
  assert environ["XLA_FLAGS"] == value == "--xla_dump_to=/tmp/x " + " ".join(xla_flags.CPU_DEFAULTS)


def test_cli_start_up_applies_the_defaults_before_jax_distributed(monkeypatch):
  import os  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from simmim_jax import distributed, main  # pylint: disable=g-import-not-at-top

  for holder in ("_COORDINATOR", "_NUM_PROCESSES", "_PROCESS_ID"):  # as if no flag was given
    monkeypatch.setattr(main, holder, types.SimpleNamespace(value=None))
  seen = {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.setattr(distributed, "initialize", lambda *args: seen.setdefault("flags", os.environ["XLA_FLAGS"]))
  monkeypatch.setattr(xla_flags.warnings, "warn", lambda *a, **k: None)  # this test process has a backend already
  main._start_distributed()
  assert seen["flags"].split() == ["--xla_dump_to=/tmp/x", *xla_flags.CPU_DEFAULTS]
