"""The one SAN normaliser and the one duration parser/formatter."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.durations import DurationError, format_duration, parse_duration, parse_share
from reconciler.sans import SANError, display, is_ip, normalise, ordered, renormalise, san_set, split

# --------------------------------------------------------------------------- DNS names


@pytest.mark.parametrize(
    "value, want",
    [
        ("example.com", "example.com"),
        ("WWW.Example.COM", "www.example.com"),
        ("www.example.com.", "www.example.com"),
        ("  www.example.com ", "www.example.com"),
        ("www.example.com\n", "www.example.com"),  # the fast path's regex once took it as it was
        ("localhost", "localhost"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("123.example.com", "123.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a" * 63 + ".example.com", "a" * 63 + ".example.com"),
    ],
)
def test_dns_names_are_lower_cased_without_a_trailing_dot(value, want):
    assert normalise(value) == want


@pytest.mark.parametrize("value", ["*.example.com", "*.EXAMPLE.com.", "*.a.b.example"])
def test_a_wildcard_as_the_whole_left_most_label_is_valid(value):
    assert normalise(value) == value.lower().rstrip(".")


@pytest.mark.parametrize(
    "value, words",
    [
        ("*.com", "whole top-level domain"),
        ("*", "whole top-level domain"),
        ("foo.*.example.com", "left-most label"),
        ("*foo.example.com", "left-most label"),
        ("f*o.example.com", "left-most label"),
        ("*.*.example.com", "left-most label"),
        ("**.example.com", "left-most label"),
    ],
)
def test_invalid_wildcards(value, words):
    with pytest.raises(SANError, match="wildcard") as info:
        normalise(value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        ".",
        "a..b",
        "-a.example",
        "a-.example",
        "under_score.example",
        "exa mple.com",
        "a\n.example",
        "bücher.example",
        "a" * 64 + ".example",
        ".".join(["a" * 60] * 5),  # 304 characters
        "http://example.com",
        "example.com/path",
    ],
)
def test_names_that_are_neither_dns_nor_ip(value):
    with pytest.raises(SANError):
        normalise(value)


def test_the_error_says_what_a_san_can_be():
    with pytest.raises(SANError, match="neither a DNS name nor an IP address"):
        normalise("exa mple.com")


def test_a_non_string_is_an_error_not_a_crash():
    with pytest.raises(SANError):
        normalise(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- IP addresses


@pytest.mark.parametrize(
    "value, want",
    [
        ("10.0.0.5", "IP:10.0.0.5"),
        (" 10.0.0.5 ", "IP:10.0.0.5"),
        ("2001:DB8::1", "IP:2001:db8::1"),
        ("2001:db8:0::1", "IP:2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "IP:2001:db8::1"),
        ("[2001:db8::1]", "IP:2001:db8::1"),
        ("[::1]", "IP:::1"),
        ("::ffff:10.0.0.1", "IP:::ffff:a00:1"),
        ("::FFFF:A00:1", "IP:::ffff:a00:1"),
        ("fe80::1", "IP:fe80::1"),
    ],
)
def test_ip_addresses_are_canonical_and_marked(value, want):
    assert normalise(value) == want


@given(st.lists(st.integers(0, 999).map(str) | st.integers(0, 99).map(lambda n: f"0{n}"), min_size=4, max_size=4))
def test_a_dotted_quad_is_an_ip_san_exactly_when_ipaddress_reads_it_as_written(parts):
    value = ".".join(parts)  # the fast path takes canonical addresses without ipaddress
    try:
        canonical = str(ipaddress.ip_address(value)) == value
    except ValueError:
        canonical = False
    if canonical:
        assert normalise(value) == f"IP:{value}"
    else:
        with pytest.raises(SANError):
            normalise(value)


def test_the_ipv6_forms_from_the_issue_are_equal():
    assert normalise("2001:DB8::1") == normalise("2001:db8:0::1") == normalise("[2001:db8::0:1]")


@pytest.mark.parametrize("value", ["999.1.1.1", "10.0.0", "1.2.3.4.5", "010.0.0.1", "1"])
def test_ipv4_look_alikes_are_neither_ip_nor_dns(value):
    with pytest.raises(SANError, match="neither a DNS name nor a valid IP address"):
        normalise(value)


def test_an_ipv6_zone_index_cannot_go_into_a_certificate():
    with pytest.raises(SANError, match="zone index") as info:
        normalise("fe80::1%eth0")
    assert "'fe80::1'" in str(info.value)


@pytest.mark.parametrize("value", ["2001:db8::g", "2001:db8:::1", "[2001:db8::1", "1:2:3:4:5:6:7:8:9"])
def test_broken_ipv6(value):
    with pytest.raises(SANError):
        normalise(value)


# --------------------------------------------------------------------------- sets


def test_san_set_counts_the_common_name_in():
    assert san_set("www.example.com") == frozenset({"www.example.com"})
    assert san_set("WWW.example.com", ["api.example.com"]) == frozenset({"www.example.com", "api.example.com"})


def test_san_set_collapses_duplicates_in_any_spelling():
    got = san_set(
        "www.example.com",
        ["WWW.EXAMPLE.COM.", "www.example.com", "10.0.0.1", "10.0.0.1", "2001:DB8::1", "[2001:db8:0::1]"],
    )
    assert got == frozenset({"www.example.com", "IP:10.0.0.1", "IP:2001:db8::1"})


def test_san_set_ignores_order():
    a = san_set("a.example", ["b.example", "10.0.0.1", "::1"])
    b = san_set("a.example", ["::1", "10.0.0.1", "b.example", "a.example"])
    assert a == b


@given(st.permutations(["a.example", "B.example.", "10.0.0.1", "2001:DB8::1", "*.c.example", "[::1]"]))
def test_san_set_is_order_independent_for_any_permutation(names):
    assert san_set("a.example", names) == san_set(
        "a.example", ["a.example", "b.example", "10.0.0.1", "2001:db8::1", "*.c.example", "::1"]
    )


def test_dns_and_ip_are_kept_apart():
    # nothing a DNS name normalises to can collide with an IP address
    assert normalise("10.0.0.1") != "10.0.0.1"
    assert is_ip(normalise("10.0.0.1")) and not is_ip(normalise("ip.example"))
    assert len(san_set("a.example", ["10.0.0.1", "ip.10.0.0.1.example"])) == 3


def test_display_split_and_ordered():
    sans = san_set("b.example", ["a.example", "10.0.0.2", "10.0.0.10", "2001:db8::1", "::1"])
    dns, ips = split(sans)
    assert dns == ["a.example", "b.example"]
    assert ips == ["10.0.0.2", "10.0.0.10", "::1", "2001:db8::1"]  # by version, then numerically
    assert ordered(sans) == ("a.example", "b.example", "10.0.0.2", "10.0.0.10", "::1", "2001:db8::1")
    assert display("IP:10.0.0.1") == "10.0.0.1" and display("a.example") == "a.example"


def _cert_with(names):
    """A real certificate carrying exactly `names` (x509 GeneralNames) as its SANs."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_a_dns_typed_ip_in_a_certificate_is_not_an_ip_san():
    """DNS:127.0.0.1 with no iPAddress "matched" a manifest asking for 127.0.0.1, but TLS
    clients only check an IP against iPAddress SANs and reject such a certificate."""
    import ipaddress

    from cryptography import x509

    from reconciler.crypto import cert_sans

    dns_typed = cert_sans(_cert_with([x509.DNSName("a.example"), x509.DNSName("127.0.0.1")]))
    ip_typed = cert_sans(_cert_with([x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    assert ip_typed == san_set("a.example", ["127.0.0.1"])
    assert dns_typed != san_set("a.example", ["127.0.0.1"])
    assert "IP:127.0.0.1" not in dns_typed and "a.example" in dns_typed
    # and it says which kind it was when shown
    assert sorted(display(s) for s in dns_typed) == ["DNS:127.0.0.1", "a.example"]


def test_a_dns_name_spelled_like_an_ip_san_cannot_pass_for_one():
    from cryptography import x509

    from reconciler.crypto import cert_sans

    got = cert_sans(_cert_with([x509.DNSName("IP:10.0.0.1"), x509.DNSName("::1")]))
    assert not any(is_ip(s) for s in got)


def test_renormalise_brings_observed_names_to_the_desired_form():
    observed = {"WWW.example.com", "www.example.com.", "IP:2001:db8:0:0::1", "IP:10.0.0.1"}
    assert renormalise(observed) == frozenset({"www.example.com", "IP:2001:db8::1", "IP:10.0.0.1"})


def test_renormalise_keeps_names_it_would_never_write_so_they_still_differ():
    observed = {"weird name", "a.example"}
    got = renormalise(observed)
    assert got == frozenset({"weird name", "a.example"})
    assert got != san_set("a.example")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("90m", 5400),
        ("12h", 43200),
        ("2d", 172800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1d12h", 129600),
        ("0h30m", 1800),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "12", "h", "1.5h", "12H", "12 h", " 12h", "-1h", "1y", "12h ", None, 12])
def test_malformed_durations_say_how_to_write_one(text):
    with pytest.raises(DurationError, match='e.g. "90m", "12h", "2d"'):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0s", "0h", "0d0h"])
def test_a_zero_duration_is_an_error(text):
    with pytest.raises(DurationError, match="is zero"):
        parse_duration(text)


@pytest.mark.parametrize("text, share", [("33%", 0.33), ("50%", 0.5), ("12.5%", 0.125), ("99.9%", 0.999)])
def test_parse_share(text, share):
    assert parse_share(text) == pytest.approx(share)


@pytest.mark.parametrize("text", ["0%", "100%", "150%", "33", "%", "-5%", "33 %", "1e1%", None])
def test_shares_outside_0_100_or_malformed(text):
    with pytest.raises(DurationError, match="share of the lifetime"):
        parse_share(text)


@pytest.mark.parametrize(
    "delta, text",
    [
        (timedelta(hours=3, minutes=12), "3h12m"),
        (timedelta(hours=3, minutes=12, seconds=40), "3h12m"),  # two most significant units
        (timedelta(days=2, hours=4, minutes=5), "2d4h"),
        (timedelta(hours=12), "12h"),
        (timedelta(seconds=45), "45s"),
        (timedelta(0), "0s"),
        (timedelta(minutes=5, seconds=1), "5m1s"),
        (timedelta(days=1, minutes=30), "1d30m"),
        (timedelta(hours=-2, minutes=-30), "-2h30m"),
        (timedelta(seconds=59.9), "59s"),
    ],
)
def test_format_duration(delta, text):
    assert format_duration(delta) == text


@given(st.integers(min_value=1, max_value=10 * 365 * 86400))
def test_formatting_then_parsing_never_gains_time_and_loses_under_one_unit(seconds):
    delta = timedelta(seconds=seconds)
    text = format_duration(delta)
    back = parse_duration(text)
    assert back <= delta
    # at most the third unit is dropped, so the loss is below the second unit's size
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    smallest = units[text[-1]]
    assert delta - back < timedelta(seconds=smallest)
