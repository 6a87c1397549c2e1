"""The local cloud: real image builds on this machine, with no Azure account.

Base images are Debian cloud images made with mmdebstrap; a build VM is one booted with systemd in a container
of its own and reached over real SSH, with its data disks as loop devices; capture writes a bootable fixed VHD (and
a fixed VHD of each data disk), and the validation VM boots that very disk in QEMU, its data disks beside it.
Staging, logs and distribution are the storage layer's (``LocalStorage``, blobs in Azurite), which this class
forwards to.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activities import build_log
from activities.clouds.aib.tags import ROLE_TEMPORARY, kiln_tags
from activities.clouds.base import LogSink, PermanentError, Progress
from activities.clouds.local.capture import capture_data_disk, capture_disk, vhd_file
from activities.clouds.local.data_disks import empty_disks, image_disks
from activities.clouds.local.host import file_lock
from activities.clouds.local.images import ImageCache, platform_image_version, resolve_platform_image
from activities.clouds.local.outputs import LocalImage
from activities.clouds.local.qemu import BootFailed, QemuVms, console_tail, qemu_id
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.vm import LocalVms, NamespaceSession, vm_id
from activities.clouds.state import state_dir, worker_secret
from activities.telemetry import record_boot_check
from workflows.models import (
    Artifact,
    BuildContext,
    BuildVm,
    CapturedImage,
    CaptureSpec,
    DistributeRequest,
    ResolvedSource,
    Resource,
    RunOutput,
    StagedArtifact,
    Staging,
    VmSpec,
)
from workflows.template import (
    Distributor,
    ImageTemplate,
    ManagedImageSource,
    PlatformImageSource,
    SharedImageVersionSource,
)

if TYPE_CHECKING:
    from activities.clouds.local.storage import LocalStorage

IMAGE_KIND = "image"
# The validation VM's serial console, kept beside customization.log and validation.log.
CONSOLE_LOG = "console.log"


def capture_id(name: str) -> str:
    return f"kiln-local/{IMAGE_KIND}/{name}"


class LocalCloud:
    """The ``Cloud`` of this machine."""

    name = "local"

    def __init__(
        self, *, storage: LocalStorage, store: ResourceStore, state: Path | None = None, boot_check: bool = True
    ) -> None:
        """``boot_check`` False skips booting a captured image that has no validators to run (under TCG that
        saves about a minute a build, and proves nothing about the image)."""
        self._state = state or state_dir()
        self._storage = storage
        self._store = store
        self._boot_check = boot_check
        self.secret = worker_secret()
        self._captures = self._state / "images" / "captured"
        self.vms = LocalVms(state=self._state, store=store, secret=self.secret)
        self.images = ImageCache(self._state / "images", in_use=self.vms.runs_on)
        self.qemu = QemuVms(state=self._state, store=store, secret=self.secret)

    async def resolve_source(self, build: BuildContext, template: ImageTemplate) -> ResolvedSource:
        resolved = await self._resolve(build, template)
        await self._storage.check_targets(template, resolved)
        return resolved

    async def close(self) -> None:
        await self._storage.close()

    async def _resolve(self, build: BuildContext, template: ImageTemplate) -> ResolvedSource:
        source = template.properties.source
        if isinstance(source, PlatformImageSource):
            return await resolve_platform_image(self.images, source, state=self._state, location=build.location)
        if isinstance(source, ManagedImageSource):
            image = await self._source_image(source.image_id, template)
            return ResolvedSource(
                image_id=source.image_id,
                exact_version=image.exact_version,
                hyper_v_generation=image.hyper_v_generation,
                size_bytes=vhd_file(image.vhd_path).size_bytes,
            )
        assert isinstance(source, SharedImageVersionSource)
        image = await self._source_image(source.image_version_id, template)
        return ResolvedSource(
            # .../versions/latest is pinned to the version it meant when the build started.
            image_id=re.sub(
                r"/versions/latest$", f"/versions/{image.exact_version}", source.image_version_id, flags=re.IGNORECASE
            ),
            exact_version=image.exact_version,
            hyper_v_generation=image.hyper_v_generation,
            size_bytes=vhd_file(image.vhd_path).size_bytes,
            revoked=image.revoked,
        )

    async def _source_image(self, image_id: str, template: ImageTemplate) -> LocalImage:
        """An image of an earlier build as this build's source. Its data disks become the build VM's, as Azure makes
        a VM's data disks from its image's; empty ones beside them are refused, as their LUNs would collide.

        Raises:
            PermanentError: ``BadDataDisk`` when the image has data disks and the template adds some.
        """
        image = await self._storage.locate_image(image_id)
        if image.data_disks and template.properties.additional_data_disks:
            raise PermanentError(
                f"properties.additionalDataDisks: the source image {image_id} has data disks of its own (LUN 0 to "
                f"{len(image.data_disks) - 1}), which the build VM gets; kiln adds no empty data disks beside them",
                kind="BadDataDisk",
            )
        return image

    async def retire_image_version(
        self, version_id: str, *, end_of_life: datetime, exclude_from_latest: bool, revoked: str = ""
    ) -> None:
        await self._storage.gallery.retire(
            version_id, end_of_life=end_of_life.isoformat(), exclude_from_latest=exclude_from_latest, revoked=revoked
        )

    async def delete_image_version(self, version_id: str) -> None:
        await self._storage.gallery.delete_version(version_id)

    async def create_vm(self, build: BuildContext, staging: Staging, spec: VmSpec) -> BuildVm:
        """A build VM boots the image's root in a container; a validation VM, and optimize.vmBoot's boot, boot the
        image's disk in QEMU (only a source validated as it is, a base with no disk yet, is a container too). Each
        has the image's data disks; a build VM of an image without any gets the template's empty ones."""
        image = await self._image_of(spec.image_id)
        if spec.purpose in ("validation", "optimization") and image is not None:
            return await self._boot(build, staging, spec, image)
        disks = image_disks(image.data_disks) if image is not None else []
        rootfs = await self._rootfs_of(spec.image_id, image)
        return await self.vms.create(build, spec, rootfs, disks or empty_disks(spec.data_disk_sizes_gb))

    async def _boot(self, build: BuildContext, staging: Staging, spec: VmSpec, image: LocalImage) -> BuildVm:
        """Boot the image, and keep its serial console's log beside the build's other logs, however it went."""
        log = await self.open_log(build, staging, CONSOLE_LOG)
        try:
            vm, seconds = await self.qemu.create(build, spec, image.vhd_path, image.data_disks)
        except BootFailed as failed:
            await log.append(failed.console)
            raise PermanentError(
                f"{failed.message}. The serial console's last lines:\n{console_tail(failed.console)}\n"
                f"Serial console log: {log.uri}",
                kind=failed.type or "BootFailed",
            ) from None
        accelerator = (await asyncio.to_thread(self._store.get, qemu_id(spec.name))).data["accelerator"]
        record_boot_check(timedelta(seconds=seconds), accelerator=accelerator)
        await log.append(
            self.qemu.console(spec.name) + b"\n" + build_log.note(f"booted to SSH in {seconds:.1f} s ({accelerator})")
        )
        return vm

    async def delete_vm(self, build: BuildContext, name: str) -> None:
        await self.qemu.delete(name)
        await self.vms.delete(name)

    async def delete_tagged(self, build_id: str) -> list[str]:
        """The build's temporary records, each gone through the delete its undo uses: VMs (their overlay, QEMU and
        address records with them) and captured images by name, then the staging (group, container, blobs)."""
        records = [r for r in await asyncio.to_thread(self._store.list, build_id=build_id) if r.role == ROLE_TEMPORARY]
        build = BuildContext(build_id=build_id, template_name="", location="", cloud=self.name)
        deletes = ((vm_id(""), self.delete_vm), (qemu_id(""), self.delete_vm), (capture_id(""), self.delete_image))
        for record in records:
            for prefix, delete in deletes:
                if record.id.startswith(prefix):
                    await delete(build, record.id.removeprefix(prefix))
        if records:
            await self.delete_staging(build)
        left = {r.id for r in await asyncio.to_thread(self._store.list, build_id=build_id)}
        return [r.id for r in records if r.id not in left]

    @asynccontextmanager
    async def agent_session(self, build: BuildContext, vm: BuildVm) -> AsyncIterator[NamespaceSession]:
        if await asyncio.to_thread(self._store.get, vm_id(vm.name)) is None:  # a validation VM boots in QEMU
            raise PermanentError(f"VM {vm.name} is no container kiln can enter", kind="NoAgentSession")
        yield self.vms.session(vm.name)

    async def capture_image(
        self, build: BuildContext, staging: Staging, vm: BuildVm, spec: CaptureSpec
    ) -> CapturedImage:
        """Stop the VM and write its disk as a bootable fixed VHD, and each data disk as a fixed VHD beside it; a
        retry after success returns the same image."""
        target = self._captures / f"{spec.name}.vhd"
        record_id = capture_id(spec.name)
        async with file_lock(self._captures / f"{spec.name}.lock"):
            record = await asyncio.to_thread(self._store.get, record_id)
            if record is None or not target.exists():
                vm_record = await asyncio.to_thread(self._store.get, vm_id(vm.name))
                if vm_record is None:
                    raise PermanentError(f"there is no local VM named {vm.name} to capture", kind="VmNotFound")
                tags = kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags)
                generation = vm_record.data["hyperVGeneration"]
                disks = await asyncio.to_thread(self.vms.data_disks.files, vm.name)
                data = {
                    "path": str(target),
                    "vm": vm.name,
                    "hyperVGeneration": generation,
                    "dataDisks": [str(self._data_disk_vhd(spec.name, lun)) for lun in range(len(disks))],
                }
                record = await asyncio.to_thread(
                    self._store.record, record_id, kind=IMAGE_KIND, build_id=build.build_id, tags=tags, data=data
                )
                await self.vms.stop(vm.name)
                # The data disks first: the OS disk's VHD is the sign that the whole capture is done.
                for disk, vhd in zip(disks, data["dataDisks"], strict=True):
                    await capture_data_disk(disk, Path(vhd))
                await capture_disk(
                    await self.vms.layers(vm.name),
                    target,
                    generation=generation,
                    source_bytes=vm_record.data.get("sourceBytes", 0),
                    os_disk_size_gb=spec.os_disk_size_gb,
                )
        vhd = vhd_file(target)
        return CapturedImage(
            boot_check=self._boot_check,
            id=record_id,
            uri=target.as_uri(),
            size_bytes=vhd.size_bytes,
            used_bytes=vhd.used_bytes,
            hyper_v_generation=record.data["hyperVGeneration"],
            data_disk_snapshots=[Path(path).as_uri() for path in record.data.get("dataDisks", [])],
            resources=[Resource(id=record_id, kind=IMAGE_KIND, owner=spec.name)],
        )

    def _data_disk_vhd(self, name: str, lun: int) -> Path:
        return self._captures / f"{name}-lun{lun}.vhd"

    async def delete_image(self, build: BuildContext, name: str) -> None:
        target = self._captures / f"{name}.vhd"
        async with file_lock(self._captures / f"{name}.lock"):
            if target.exists():
                await self.images.forget_unpacked(target)  # a validation VM's copy of it
            target.unlink(missing_ok=True)
            for data_disk in self._captures.glob(f"{name}-lun*"):  # each VHD, or what a capture cut short left
                data_disk.unlink(missing_ok=True)
            await asyncio.to_thread(self._store.forget, capture_id(name))
            (self._captures / f"{name}.lock").unlink(missing_ok=True)

    async def _rootfs_of(self, image_id: str, image: LocalImage | None) -> Path:
        """The root filesystem a VM of ``image_id`` starts from: a base, or the unpacked disk of a build's ``image``."""
        if image is not None:
            return await self.images.unpacked(image.vhd_path)
        platform = platform_image_version(image_id)
        assert platform is not None  # an image no build made is a base
        offer, version = platform
        return (await self.images.resolve(offer, version)).rootfs

    async def _image_of(self, image_id: str) -> LocalImage | None:
        """The disks of an image from a build (this build's capture, a managed image, a gallery version); None for
        a base, which is a root filesystem only."""
        if platform_image_version(image_id) is not None:
            return None
        if image_id.startswith(capture_id("")):
            record = await asyncio.to_thread(self._store.get, image_id)
            if record is None:
                raise PermanentError(f"there is no captured image {image_id}", kind="SourceImageNotFound")
            data_disks = tuple(Path(path) for path in record.data.get("dataDisks", []))
            return LocalImage(Path(record.data["path"]), "", record.data["hyperVGeneration"], data_disks=data_disks)
        return await self._storage.locate_image(image_id)

    # The storage side: staging, logs and distribution live in LocalStorage.

    async def create_staging(self, build: BuildContext) -> Staging:
        return await self._storage.create_staging(build)

    async def delete_staging(self, build: BuildContext) -> None:
        await self._storage.delete_staging(build)

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact:
        return await self._storage.stage_artifact(build, staging, artifact, data)

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes:
        return await self._storage.read_staged(build, staged)

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> LogSink:
        return await self._storage.open_log(build, staging, name)

    async def distribute(
        self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress: Progress
    ) -> RunOutput:
        return await self._storage.distribute(request, resume=resume, progress=progress)

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        await self._storage.delete_output(build, target, index)


__all__ = ["LocalCloud"]
