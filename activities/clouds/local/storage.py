"""The local cloud's storage: staging, logs and distribution, on the local accounts in Azurite.

``LocalStorage`` is what ``LocalCloud`` forwards these steps to. Each concern has its module: ``accounts`` (the
blob clients and records), ``staging``, ``vhd_pages`` (used pages up and down), one module per distribution target
(``vhd_target``, ``managed_image_target``, ``gallery_target``) and ``outputs`` (what the targets share).
"""

from __future__ import annotations

from typing import Any

from activities.clouds.aib.ids import parse_managed_image_id
from activities.clouds.aib.targets import check_targets
from activities.clouds.base import Progress
from activities.clouds.local import azurite, outputs
from activities.clouds.local.accounts import LocalAccounts
from activities.clouds.local.gallery_target import GalleryTarget, LocalGalleries
from activities.clouds.local.managed_image_target import ManagedImageTarget
from activities.clouds.local.outputs import LocalImage
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.staging import LocalStaging
from activities.clouds.local.vhd_target import VhdTarget
from workflows.models import (
    BuildContext,
    DistributeRequest,
    ResolvedSource,
    RunOutput,
)
from workflows.template import (
    Distributor,
    ImageTemplate,
    ManagedImageDistributor,
    VhdDistributor,
)


class LocalStorage(LocalStaging):
    """Staging storage, logs and distribution of the local cloud, on Azurite; one per worker. The staging and the
    logs are ``LocalStaging``'s; distribution goes to the target's module."""

    def __init__(self, *, store: ResourceStore, endpoint: str | None = None) -> None:
        super().__init__(LocalAccounts(store=store, endpoint=endpoint))
        self.store = store
        self.endpoint = self.accounts.endpoint
        self._galleries = LocalGalleries(self.accounts)
        self._vhd = VhdTarget(self.accounts)
        self._managed_image = ManagedImageTarget(self.accounts)
        self._gallery = GalleryTarget(self.accounts, self._galleries)

    async def close(self) -> None:
        await self.accounts.close()

    async def __aenter__(self) -> LocalStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- distribution

    async def check_targets(self, template: ImageTemplate, source: ResolvedSource) -> None:
        """AIB's rules on the template's targets, and a local storage account for each region they name."""
        await check_targets(template, source, galleries=self._galleries, check_region=azurite.account_for_region)

    async def distribute(
        self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress: Progress
    ) -> RunOutput:
        # The caller may hand its live checkpoint in as ``resume`` and rewrite it on each progress call.
        resume = dict(resume or {})
        target = request.target
        if isinstance(target, VhdDistributor):
            return await self._vhd.distribute(request, target, resume, progress)
        if isinstance(target, ManagedImageDistributor):
            return await self._managed_image.distribute(request, target, resume, progress)
        return await self._gallery.distribute(request, target, resume, progress)

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        await outputs.delete_output(self.accounts, build, target, index)

    @property
    def gallery(self) -> GalleryTarget:
        """The gallery's versions, for their lifecycle (end of life, revocation, retention)."""
        return self._gallery

    # ---- images as sources

    async def locate_image(self, image_id: str) -> LocalImage:
        """The VHD of a local managed image or gallery version, downloaded once into the image cache."""
        if parse_managed_image_id(image_id) is not None:
            return await self._managed_image.locate(image_id)
        return await self._gallery.locate(image_id)
