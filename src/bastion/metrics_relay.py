"""Several engines' `/metrics` pages as one page: every sample labelled with its engine.

Prometheus's text format wants all samples of a family under one HELP/TYPE block, so
the pages cannot simply be concatenated: each is parsed (prometheus_client's parser),
merged family by family in the order first seen, and written out again. Every sample
gets `engine="<model>/<replica>"`, the value the gateway's own `engine` label uses. A
sample that already carries an `engine` label (vLLM V1 numbers its engine cores so)
keeps it as `exported_engine`, as Prometheus itself renames a scraped label that
collides with a target label. Families that two engines type differently keep the
first engine's type; the other engine's samples of that family are left out.

`bastion_upstream_scrape_up{engine}` (1 answered, 0 did not) is added, like Prometheus's
own `up`, so an engine missing from the page is visible in the page.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

ENGINE_LABEL = "engine"
EXPORTED_ENGINE_LABEL = "exported_engine"
SCRAPE_UP = "bastion_upstream_scrape_up"
_SCRAPE_UP_HELP = "Whether the engine answered this relay's scrape of its /metrics (1) or not."


class MergedPages(Collector):
    """Engine pages added one by one (`add`, `missing`), then written once (`render`).

    `label` names the source of each page (`engine`, or `worker` for the workers of one gateway),
    `up` the gauge that says which sources answered."""

    def __init__(
        self,
        label: str = ENGINE_LABEL,
        up: tuple[str, str] = (SCRAPE_UP, _SCRAPE_UP_HELP),
    ) -> None:
        self._label = label
        self._exported = "exported_" + label
        self._families: dict[str, Metric] = {}
        self._up = Metric(up[0], up[1], "gauge")

    def add(self, engine: str, text: str) -> None:
        """Merge one engine's page. Raises ValueError if it is not Prometheus text (then nothing is added)."""
        families = list(text_string_to_metric_families(text))  # the whole page parses, or none of it is used
        for family in families:
            merged = self._families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                self._families[family.name] = merged
            elif merged.type != family.type:
                continue
            merged.samples.extend(self._labelled(sample, engine) for sample in family.samples)
        self._up.samples.append(Sample(self._up.name, {self._label: engine}, 1.0))

    def missing(self, engine: str) -> None:
        """An engine that did not answer (or not with a page): only its `scrape_up` 0."""
        self._up.samples.append(Sample(self._up.name, {self._label: engine}, 0.0))

    def _labelled(self, sample: Sample, source: str) -> Sample:
        labels = dict(sample.labels)
        if self._label in labels:
            labels[self._exported] = labels.pop(self._label)
        labels[self._label] = source
        return sample._replace(labels=labels)

    def collect(self) -> Iterator[Metric]:
        yield from self._families.values()
        yield self._up

    def render(self) -> bytes:
        """The merged page in Prometheus text format 0.0.4."""
        return generate_latest(self)
