"""Monthly cost model: a dated price table and the estimate for one stack.

Amounts are kept in integer US cents (rounded once per line item) so totals add up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

# Source: the providers' public price lists as of 2025-10 (Vultr "Cloud Compute - Regular";
# Hetzner's cost-optimised CX line that replaced CX22 in Oct 2025, net of VAT, including the
# primary IPv4 at EUR 0.50; DigitalOcean's Basic Regular droplets, IPv4 and IPv6 included, for
# the witness). Re-check the pricing pages when changing a plan.
PRICES_AS_OF = "2025-10"

# provider -> plan -> (currency, monthly price)
PLANS: dict[str, dict[str, tuple[str, Decimal]]] = {
    "vultr": {
        "vc2-1c-1gb": ("USD", Decimal("5.00")),
        "vc2-1c-2gb": ("USD", Decimal("10.00")),
        "vc2-2c-2gb": ("USD", Decimal("15.00")),
        "vc2-2c-4gb": ("USD", Decimal("20.00")),
        "vc2-4c-8gb": ("USD", Decimal("40.00")),
    },
    "hetzner": {
        "cx23": ("EUR", Decimal("3.49")),
        "cx33": ("EUR", Decimal("5.49")),
        "cx43": ("EUR", Decimal("9.49")),
        "cx53": ("EUR", Decimal("17.99")),
    },
    # The witness's provider (ADR 13): 512 MB is enough for the etcd member; 1 GB leaves room
    # for the monitor that joins it later.
    "digitalocean": {
        "s-1vcpu-512mb-10gb": ("USD", Decimal("4.00")),
        "s-1vcpu-1gb": ("USD", Decimal("6.00")),
        "s-1vcpu-2gb": ("USD", Decimal("12.00")),
    },
    # `make local`: every region on this machine.
    "local": {"local": ("USD", Decimal("0"))},
}

# provider -> (currency, price per GB-month of block storage)
VOLUME_PER_GB: dict[str, tuple[str, Decimal]] = {
    "vultr": ("USD", Decimal("0.10")),
    "hetzner": ("EUR", Decimal("0.044")),
    "digitalocean": ("USD", Decimal("0.10")),
    "local": ("USD", Decimal("0")),
}

# Locations the plans above are sold in.
LOCATIONS: dict[str, frozenset[str]] = {
    "vultr": frozenset({"ewr", "ord", "atl", "mia", "dfw", "lax", "sea", "sjc", "ams", "fra", "lhr"}),
    "hetzner": frozenset({"fsn1", "nbg1", "hel1"}),
    "digitalocean": frozenset({"nyc1", "nyc3", "sfo2", "sfo3", "tor1", "ams3", "lon1", "fra1", "sgp1", "blr1", "syd1"}),
}

# TLD -> registration price per year, amortised monthly. ".ai" uses the FSD §11.2 figure
# (~$3/month for both domains); typical .ai renewals cost more -- see README "What it costs".
DOMAIN_USD_PER_YEAR: dict[str, Decimal] = {"ai": Decimal("18.00")}


# Object storage for the backups, by the S3 endpoint's domain: provider, currency, price, and
# whether it is per GB-month (Backblaze B2) or a flat month (the others' smallest tier, 1 TB).
BACKUP_STORAGE: dict[str, tuple[str, str, Decimal, bool]] = {
    "backblazeb2.com": ("backblaze", "USD", Decimal("0.006"), True),
    "your-objectstorage.com": ("hetzner", "EUR", Decimal("4.99"), False),
    "digitaloceanspaces.com": ("digitalocean", "USD", Decimal("5.00"), False),
    "vultrobjects.com": ("vultr", "USD", Decimal("6.00"), False),
}
# What a month of backups holds: 30 daily dumps and the WAL since the oldest full backup, for a
# database of a few hundred MB (estimated: bench/backup.py's dump sizes, WAL at our write rate).
BACKUP_GB = 20


def backup_provider(endpoint: str) -> str | None:
    """The provider an S3 endpoint belongs to, when it is one we know (not a local or private one)."""
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return next((v[0] for domain, v in BACKUP_STORAGE.items() if host == domain or host.endswith("." + domain)), None)


WITNESS = "witness"  # the witness host's name in the items (config.Witness.name)


@dataclass(frozen=True)
class CostItem:
    item: str
    cents: int


@dataclass(frozen=True)
class Estimate:
    items: tuple[CostItem, ...]
    target_cents: int
    ceiling_cents: int

    @property
    def total_cents(self) -> int:
        return sum(i.cents for i in self.items)

    @property
    def witness_cents(self) -> int:
        """What the witness adds (0 without one): the README shows the total with and without it."""
        return sum(i.cents for i in self.items if i.item.startswith(f"{WITNESS}:"))

    def as_output(self) -> dict:
        return {
            "total": usd(self.total_cents),
            "target": usd(self.target_cents),
            "ceiling": usd(self.ceiling_cents),
            "prices_as_of": PRICES_AS_OF,
            "items": [{"item": i.item, "usd": usd(i.cents)} for i in self.items],
        }


def usd(cents: int) -> float:
    return round(cents / 100, 2)


def to_cents(amount: Decimal, currency: str, eur_usd: Decimal) -> int:
    usd_amount = amount * eur_usd if currency == "EUR" else amount
    return int((usd_amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def registrable(domain: str) -> bool:
    """A domain directly under its TLD is registered (and paid for); deeper names are subzones."""
    return domain.count(".") == 1


def estimate(regions, budget, witness=None, backup=None) -> Estimate:
    """Price every region's host and volume, the witness's host, each registered domain, and the
    backups' object storage (when its endpoint is a provider we know).

    `regions`, `budget` and `witness` are the validated config models (see components.config);
    any plan, location or TLD missing from the tables above was already refused there.
    """
    eur_usd = Decimal(str(budget.eur_usd))
    items: list[CostItem] = []
    for r in [*regions, *([witness] if witness else [])]:
        currency, price = PLANS[r.provider][r.plan]
        items.append(CostItem(f"{r.name}: {r.provider} {r.plan} in {r.location}", to_cents(price, currency, eur_usd)))
        if r.volume_gb:
            currency, per_gb = VOLUME_PER_GB[r.provider]
            items.append(CostItem(f"{r.name}: {r.volume_gb} GB volume", to_cents(per_gb * r.volume_gb, currency, eur_usd)))
    for r in regions:
        if registrable(r.domain):
            per_year = DOMAIN_USD_PER_YEAR[r.domain.rsplit(".", 1)[1]]
            items.append(CostItem(f"domain {r.domain} (yearly / 12)", to_cents(per_year / 12, "USD", eur_usd)))
    if backup is not None and (provider := backup_provider(backup.s3_endpoint)):
        domain = next(d for d, v in BACKUP_STORAGE.items() if v[0] == provider)
        _, currency, price, per_gb = BACKUP_STORAGE[domain]
        what = f"~{BACKUP_GB} GB at {provider}" if per_gb else f"{provider} object storage"
        items.append(CostItem(f"backups: {what}", to_cents(price * BACKUP_GB if per_gb else price, currency, eur_usd)))
    return Estimate(
        tuple(items),
        target_cents=to_cents(Decimal(str(budget.target_usd)), "USD", eur_usd),
        ceiling_cents=to_cents(Decimal(str(budget.ceiling_usd)), "USD", eur_usd),
    )
