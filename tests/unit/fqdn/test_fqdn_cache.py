"""The FQDN cache: what one answer teaches, TTLs and the minimum TTL, the per-name cap, expiry
kept alive by open connections, and CNAME chains."""

from __future__ import annotations

from dataplane.fqdn.cache import AnswerRecord, FqdnCache, chain_addresses
from dataplane.fqdn.lookup import candidates

A = "A"


def rec(name: str, kind: str, ttl: int, data: str) -> AnswerRecord:
    return AnswerRecord(name, kind, ttl, data)


def test_an_answer_teaches_the_name_asked_and_every_name_of_its_cname_chain() -> None:
    cache = FqdnCache()
    records = [rec("www.example.com", "CNAME", 60, "edge.cdn.example.net"),
               rec("edge.cdn.example.net", A, 20, "203.0.113.20"),
               rec("unrelated.example.org", A, 20, "198.51.100.9")]
    learned = cache.learn("shop/checkout", "WWW.Example.com.", records, now=100.0)
    assert {(e.name, e.address) for e in learned} == {("www.example.com", "203.0.113.20"),
                                                      ("edge.cdn.example.net", "203.0.113.20")}
    assert cache.address_names() == {"203.0.113.20": ("edge.cdn.example.net", "www.example.com")}
    # The TTL is the smallest of the records followed; the unrelated record taught nothing.
    assert {e.ttl for e in learned} == {20} and {e.expires_at for e in learned} == {120.0}


def test_a_cname_loop_ends_and_aaaa_records_teach_nothing() -> None:
    names, addresses, _ = chain_addresses("a.example", [rec("a.example", "CNAME", 5, "b.example"),
                                                        rec("b.example", "CNAME", 5, "a.example"),
                                                        rec("b.example", "AAAA", 5, "2001:db8::1")])
    assert names == ["a.example", "b.example"] and addresses == []
    assert FqdnCache().learn("ns/p", "a.example", [rec("a.example", "AAAA", 5, "2001:db8::1")], 0.0) == []


def test_min_ttl_lengthens_short_ttls_and_a_later_answer_never_shortens() -> None:
    cache = FqdnCache(min_ttl=30)
    cache.learn("ns/p", "api.example.com", [rec("api.example.com", A, 2, "203.0.113.5")], now=0.0)
    (entry,) = cache.entries.values()
    assert entry.expires_at == 30.0
    cache.learn("ns/p", "api.example.com", [rec("api.example.com", A, 1, "203.0.113.5")], now=5.0)
    assert entry.key in cache.entries and cache.entries[entry.key].expires_at == 35.0
    cache.min_ttl = 0
    cache.learn("ns/p", "api.example.com", [rec("api.example.com", A, 1, "203.0.113.5")], now=6.0)
    assert cache.entries[entry.key].expires_at == 35.0  # 7.0 would shorten it


def test_the_cap_per_name_keeps_the_entries_that_expire_last_and_is_per_endpoint() -> None:
    cache = FqdnCache(max_ips_per_name=2)
    for i, now in enumerate((0.0, 1.0, 2.0)):
        cache.learn("ns/a", "many.example.com", [rec("many.example.com", A, 10, f"203.0.113.{i + 1}")], now=now)
    cache.learn("ns/b", "many.example.com", [rec("many.example.com", A, 10, "203.0.113.1")], now=3.0)
    assert sorted(e.address for e in cache.entries.values() if e.endpoint == "ns/a") == ["203.0.113.2", "203.0.113.3"]
    assert [e.address for e in cache.entries.values() if e.endpoint == "ns/b"] == ["203.0.113.1"]
    # The node-wide view is the union: ns/b's lookup still gives .1 its name.
    assert set(cache.address_names()) == {"203.0.113.1", "203.0.113.2", "203.0.113.3"}


def test_expiry_removes_unless_the_endpoint_has_a_connection_open_to_the_address() -> None:
    cache = FqdnCache()
    cache.learn("ns/a", "x.example.com", [rec("x.example.com", A, 5, "203.0.113.7")], now=0.0)
    cache.learn("ns/b", "x.example.com", [rec("x.example.com", A, 5, "203.0.113.7")], now=0.0)
    assert cache.expire(4.9, set()) == []
    removed = cache.expire(5.0, {("ns/a", "203.0.113.7")})
    assert [e.endpoint for e in removed] == ["ns/b"]
    (kept,) = cache.entries.values()
    assert kept.endpoint == "ns/a" and kept.zombie
    assert cache.address_names() == {"203.0.113.7": ("x.example.com",)}
    assert [e.endpoint for e in cache.expire(6.0, set())] == ["ns/a"]
    assert cache.address_names() == {}


def test_the_cap_keeps_the_first_addresses_of_one_answer() -> None:
    cache = FqdnCache(max_ips_per_name=2)
    cache.learn("ns/a", "many.example.com", [rec("many.example.com", A, 10, f"203.0.113.{i}") for i in (1, 2, 3)], 0.0)
    assert sorted(e.address for e in cache.entries.values()) == ["203.0.113.1", "203.0.113.2"]


def test_without_a_datapath_every_expired_entry_goes() -> None:
    cache = FqdnCache()
    cache.learn("ns/a", "x.example.com", [rec("x.example.com", A, 1, "203.0.113.7")], now=0.0)
    assert len(cache.expire(2.0, None)) == 1


def test_search_path_candidates_follow_ndots() -> None:
    search = ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    assert candidates("api.example.com", search) == [
        "api.example.com.shop.svc.cluster.local", "api.example.com.svc.cluster.local",
        "api.example.com.cluster.local", "api.example.com"]
    assert candidates("api.example.com.", search) == ["api.example.com"]
    assert candidates("a.b.c.d.e.f", search)[0] == "a.b.c.d.e.f"
