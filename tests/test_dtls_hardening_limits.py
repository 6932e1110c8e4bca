"""ServerLimits are checked when made (issue 10, item 8, the DTLS half): in the engine a bad
value raises LimitError naming the field and the allowed range; `devid serve` turns it into one
line naming the flag, exit status 2."""

from __future__ import annotations

import math

import pytest

from devid.gateway.cli.dispatch import build_parser
from devid.gateway.dtls import engine as E
from devid.gateway.dtls.limits import MAX_MTU, MIN_MTU

from .conftest import free_port, register_device, run_devid
from .dtls_helpers import FakeNetwork, client_context_for, server_engine


@pytest.mark.parametrize("field,value,allowed", [
    ("idle_timeout", math.nan, "a finite number of seconds > 0 and at most 604800"),
    ("idle_timeout", 0, "a finite number of seconds > 0 and at most 604800"),
    ("idle_timeout", -1.0, "a finite number of seconds > 0 and at most 604800"),
    ("idle_timeout", 1e9, "a finite number of seconds > 0 and at most 604800"),
    ("handshake_timeout", math.inf, "a finite number of seconds from 1 to 600"),
    ("handshake_timeout", 0.5, "a finite number of seconds from 1 to 600"),
    ("cookie_rotation", 0.0, "a finite number of seconds from 1 to 3600"),
    ("cookie_rotation", math.nan, "a finite number of seconds from 1 to 3600"),
    ("max_sessions", 0, "a whole number >= 1"),
    ("max_half_open", -5, "a whole number >= 1"),
    ("max_sessions_per_device", 0, "a whole number >= 1"),
    ("max_sessions", 2.5, "a whole number >= 1"),
    ("max_sessions", True, "a whole number >= 1"),
    ("max_half_open_per_address", 0, "a whole number from 1 to the half-open cap (1000)"),
    ("max_half_open_per_address", 1001, "a whole number from 1 to the half-open cap (1000)"),
    ("mtu", 0, f"a whole number of bytes from {MIN_MTU} to {MAX_MTU}"),
    ("mtu", 40, f"a whole number of bytes from {MIN_MTU} to {MAX_MTU}"),
    ("mtu", MIN_MTU - 1, f"a whole number of bytes from {MIN_MTU} to {MAX_MTU}"),
    ("mtu", MAX_MTU + 1, f"a whole number of bytes from {MIN_MTU} to {MAX_MTU}"),
    ("idle_timeout", "600", "a finite number of seconds > 0 and at most 604800"),
    ("ipv6_prefix_length", 31, "a whole number of bits from 32 to 128"),
    ("ipv6_prefix_length", 129, "a whole number of bits from 32 to 128"),
    ("ipv6_prefix_length", 64.0, "a whole number of bits from 32 to 128"),
    ("handshake_burst_per_address", 0, "a whole number from 1 to 1000000"),
    ("handshake_burst_per_address", 1_000_001, "a whole number from 1 to 1000000"),
    ("handshake_rate_per_address", 0, "a finite number of handshakes a second from 0.001 to 1000000"),
    ("handshake_rate_per_address", math.nan, "a finite number of handshakes a second from 0.001 to 1000000"),
    ("handshake_rate_per_address", math.inf, "a finite number of handshakes a second from 0.001 to 1000000"),
    ("handshake_rate_per_address", 2e6, "a finite number of handshakes a second from 0.001 to 1000000"),
    ("handshake_rate_per_address", "20", "a finite number of handshakes a second from 0.001 to 1000000"),
])
def test_limit_out_of_range_is_refused(field, value, allowed):
    with pytest.raises(E.LimitError) as info:
        E.ServerLimits(**{field: value})
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.field, err.allowed, err.value) == (field, allowed, value) or (
        value != value and (err.field, err.allowed) == (field, allowed))          # nan != nan
    assert str(err) == f"{field} must be {allowed} (got {value!r})"


def test_limits_at_the_edges_are_accepted():
    E.ServerLimits(max_sessions=1, max_half_open=1, max_sessions_per_device=1, handshake_timeout=1,
                   idle_timeout=0.001, mtu=MIN_MTU, cookie_rotation=1)
    E.ServerLimits(handshake_timeout=600, idle_timeout=7 * 86400, mtu=MAX_MTU, cookie_rotation=3600,
                   max_half_open=50, max_half_open_per_address=50)
    E.ServerLimits(ipv6_prefix_length=32, handshake_burst_per_address=1, handshake_rate_per_address=0.001)
    E.ServerLimits(ipv6_prefix_length=128, handshake_burst_per_address=1_000_000, handshake_rate_per_address=1e6)
    defaults = E.ServerLimits()
    assert (defaults.ipv6_prefix_length, defaults.handshake_burst_per_address,
            defaults.handshake_rate_per_address) == (64, 1000, 100.0)


def test_smallest_mtu_completes_a_handshake(data, ca, registry):
    """MIN_MTU is the measured floor: at MIN_MTU a full mutual-auth handshake with the gateway's
    real chain completes (every datagram within it) and application data flows; one byte less and
    the gateway's first flight never leaves (OpenSSL refuses the MTU)."""
    key, issued = register_device(ca, "SN1", "temperature-sensor")

    def attempt(mtu):
        srv = server_engine(data, registry, limits=E.ServerLimits(mtu=MIN_MTU))
        srv.mtu = mtu                 # below MIN_MTU only by going around the check
        net = FakeNetwork(srv)
        ctx = client_context_for(issued.cert, [data.cert("manufacturing")], key, data.cert("root"))
        client = E.ClientEngine(ctx, ("gw", 5684), mtu=mtu)
        ok = net.run(client, lambda: client.established and net.peer in srv.sessions
                     and srv.sessions[net.peer].state == E.State.ESTABLISHED, real_timeout=3)
        return ok, srv, net, client

    ok, srv, net, client = attempt(MIN_MTU)
    assert ok and max(size for direction, size in net.log if direction == "s2c") <= MIN_MTU
    net.from_client(client.send(b"x" * 100, net.now))
    net.deliver_all(client)
    assert E.ApplicationData(net.peer, b"x" * 100) in net.server_events
    ok, srv, net, client = attempt(MIN_MTU - 1)
    assert not ok and srv.stats.handshakes == 0


# -- the flags of `devid serve` -------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--idle-timeout", "0", "--idle-timeout must be a finite number of seconds > 0 and at most 604800 (got 0.0)"),
    ("--idle-timeout", "nan", "--idle-timeout must be a finite number of seconds > 0 and at most 604800 (got nan)"),
    ("--handshake-timeout", "inf", "--handshake-timeout must be a finite number of seconds from 1 to 600 (got inf)"),
    ("--handshake-timeout", "-3", "--handshake-timeout must be a finite number of seconds from 1 to 600 (got -3.0)"),
    ("--mtu", "0", f"--mtu must be a whole number of bytes from {MIN_MTU} to {MAX_MTU} (got 0)"),
    ("--mtu", "40", f"--mtu must be a whole number of bytes from {MIN_MTU} to {MAX_MTU} (got 40)"),
    ("--mtu", "70000", f"--mtu must be a whole number of bytes from {MIN_MTU} to {MAX_MTU} (got 70000)"),
    ("--max-sessions", "0", "--max-sessions must be a whole number >= 1 (got 0)"),
    ("--max-half-open", "0", "--max-half-open must be a whole number >= 1 (got 0)"),
    ("--max-half-open-per-address", "0",
     "--max-half-open-per-address must be a whole number from 1 to the half-open cap (1000) (got 0)"),
    ("--max-half-open-per-address", "5000",
     "--max-half-open-per-address must be a whole number from 1 to the half-open cap (1000) (got 5000)"),
    ("--max-sessions-per-device", "0", "--max-sessions-per-device must be a whole number >= 1 (got 0)"),
    ("--ipv6-prefix-length", "16", "--ipv6-prefix-length must be a whole number of bits from 32 to 128 (got 16)"),
    ("--handshake-burst-per-address", "0",
     "--handshake-burst-per-address must be a whole number from 1 to 1000000 (got 0)"),
    ("--handshake-rate-per-address", "0",
     "--handshake-rate-per-address must be a finite number of handshakes a second from 0.001 to 1000000 (got 0.0)"),
    ("--handshake-rate-per-address", "nan",
     "--handshake-rate-per-address must be a finite number of handshakes a second from 0.001 to 1000000 (got nan)"),
])
def test_bad_serve_flag_is_one_line_naming_the_flag(data, flag, value, message):
    proc = run_devid("serve", "--listen", f"127.0.0.1:{free_port()}", "--workers", "1", f"{flag}={value}",
                     data_dir=data.path)
    assert proc.returncode == 2, proc.stderr.decode()
    assert proc.stderr.decode().splitlines() == [f"devid: error: {message}"]
    assert proc.stdout == b""


def test_bad_flag_is_reported_before_the_data_directory_is_needed(tmp_path):
    proc = run_devid("serve", "--mtu", "40", data_dir=tmp_path / "nothing-here")
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines() == [f"devid: error: --mtu must be a whole number of bytes from "
                                                 f"{MIN_MTU} to {MAX_MTU} (got 40)"]


def test_old_flag_name_still_works_with_a_warning(data, capsys):
    """--max-sessions-per-identity is a hidden, deprecated name of --max-sessions-per-device."""
    proc = run_devid("serve", "--max-sessions-per-identity", "0", data_dir=data.path)
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines() == [
        "devid: warning: --max-sessions-per-identity is deprecated, use --max-sessions-per-device",
        "devid: error: --max-sessions-per-device must be a whole number >= 1 (got 0)"]
    assert b"per-identity" not in run_devid("serve", "--help").stdout
    args = build_parser().parse_args(["serve", "--max-sessions-per-identity", "3"])
    assert args.max_sessions_per_device == 3
    assert build_parser().parse_args(["serve"]).max_sessions_per_device is None     # devid.toml or the default
