"""The one SAN normaliser.

A SAN set is a frozenset of strings: DNS names lower-cased without a trailing dot,
IP addresses in canonical form prefixed "IP:" so a DNS name can never equal an IP.
A certificate's dNSName that is not a DNS name we would write (an address spelled as a
name, "DNS:127.0.0.1") keeps a "DNS:" prefix: TLS clients match an address only against
iPAddress entries, so it must never equal the "IP:" SAN a manifest asks for.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

# \Z, not $, ends each pattern: $ also matches before a final newline ("a.example\n" is the
# name a.example, stripped like other whitespace; "a\n.example" is no name at all)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
# lower-case LDH labels with at least one letter somewhere (so never an IPv4 lookalike),
# optionally a leading "*." on a name of three or more labels
_PLAIN_DNS = re.compile(
    r"^(?=.{1,253}\Z)(?=.*[a-z])(?:\*\.(?=[^.]+\.[^.]+))?(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*\Z"
)
# an IPv4 address already in canonical form: four decimal octets 0-255, no leading zeros
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}\Z")
_MAYBE_IP = re.compile(r"^[0-9.]+\Z|^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.%]*(%.*)?\Z")


class SANError(ValueError):
    pass


def normalise(value: str) -> str:
    """Return the canonical form of one SAN, or raise SANError saying why it is neither DNS nor IP."""
    if not isinstance(value, str) or not value.strip():
        raise SANError(f"{value!r} is empty; a SAN is a DNS name or an IP address")
    if _PLAIN_DNS.match(value):  # the common case, already canonical: one regex, no parsing
        return value
    if _PLAIN_IPV4.match(value):  # the same for an address (ipaddress would give it back as it is)
        return "IP:" + value
    text = value.strip()
    _refuse_non_ascii(value, text)
    ip = _address(value, text)
    return "IP:" + str(ip) if ip is not None else _dns_name(value, text)


def _address(value: str, text: str):
    """The IP address `text` spells (brackets allowed), or None when it spells none."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        # only strings that could be addresses pay for the attempt (exceptions are slow)
        ip = ipaddress.ip_address(candidate) if _MAYBE_IP.match(candidate) else None
    except ValueError:
        return None
    if ip is not None and getattr(ip, "scope_id", None):
        # a zone index ("%eth0") only means something on this host; no certificate can carry it
        raise SANError(
            f"{value!r} has a zone index; a certificate can only hold the address, write {str(ip).split('%')[0]!r}"
        )
    return ip


def _dns_name(value: str, text: str) -> str:
    name = text.lower().rstrip(".")
    if len(name) > 253:
        raise SANError(f"{value!r} is longer than 253 characters")
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) >= 3:
            continue
        if label == "*" and i == 0:
            raise SANError(
                f"{value!r} is a wildcard for a whole top-level domain; "
                'a wildcard needs a domain under it, e.g. "*.example.com"'
            )
        if "*" in label:
            raise SANError(
                f"{value!r} has a wildcard that is not a whole left-most label; write e.g. \"*.example.com\""
            )
        if not _LABEL.match(label):
            raise SANError(f"{value!r} is neither a DNS name nor an IP address (label {label!r})")
    if all(label.isdigit() for label in labels):
        raise SANError(f"{value!r} is neither a DNS name nor a valid IP address")
    return name


def _refuse_non_ascii(value: str, text: str) -> None:
    """Lower-casing folds the Kelvin sign (U+212A) into "k" and IDNA/NFKC would fold
    fullwidth letters: a different name from the one written. Names in a certificate are
    ASCII, so anything else is refused, naming the character."""
    for ch in text:
        if ord(ch) < 128:
            continue
        name = unicodedata.name(ch, "unnamed character")
        folded = unicodedata.normalize("NFKC", ch).lower()
        if folded.isascii() and folded.isprintable():
            fix = f"it only looks like {folded!r}; write {folded!r}"
        else:
            fix = "write an internationalised name in its xn-- (punycode) form"
        raise SANError(f"{value!r} holds {ch!r} (U+{ord(ch):04X} {name}), and names in a certificate are ASCII: {fix}")


def san_set(common_name: str, sans: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The desired SAN set: the SANs plus the common name, normalised."""
    return frozenset(normalise(s) for s in (common_name, *sans))


def from_certificate(dns_names, ip_addresses) -> frozenset[str]:
    """A certificate's SANs, typed as it holds them, in the canonical form of a desired set.
    `ip_addresses`: ipaddress objects from iPAddress entries; `dns_names`: dNSName strings,
    normalised only when they are DNS names (anything else keeps a "DNS:" prefix)."""
    out = {f"IP:{ip}" for ip in ip_addresses}
    for name in dns_names:
        try:
            canonical = normalise(name) if name == name.strip() else None
        except SANError:
            canonical = None
        out.add(canonical if canonical is not None and not is_ip(canonical) else f"DNS:{name}")
    return frozenset(out)


def is_ip(san: str) -> bool:
    return san.startswith("IP:")


def display(san: str) -> str:
    return san[3:] if san.startswith("IP:") else san


def split(sans) -> tuple[list[str], list[str]]:
    """(dns names, ip strings) in sorted order, for building requests and printing."""
    dns = sorted(s for s in sans if not is_ip(s))
    ips = sorted(
        (display(s) for s in sans if is_ip(s)), key=lambda x: (ipaddress.ip_address(x).version, ipaddress.ip_address(x))
    )
    return dns, ips


def ordered(sans) -> tuple[str, ...]:
    dns, ips = split(sans)
    return tuple(dns) + tuple(ips)


def renormalise(observed) -> frozenset[str]:
    """Untyped names (a request's, "IP:" allowed) in the canonical form of a desired set.
    Names we would never write are kept as they are: they differ, which is all that matters.
    A certificate's names are typed: read them with `from_certificate`."""
    out = set()
    for s in observed:
        try:
            out.add(normalise(display(s)))
        except SANError:
            out.add(s)
    return frozenset(out)
