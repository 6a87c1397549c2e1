"""``AzureCloud``: the ``Cloud`` protocol on Azure. See the package docstring for its configuration."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.ids import COMPUTE, parse_platform_image_id, platform_image_id, region_key, resource_id
from activities.clouds.aib.names import admin_user_of, staging_group
from activities.clouds.aib.tags import ROLE_TEMPORARY, TAG_BUILD_ID, TAG_REVOKED, blob_metadata, build_tags
from activities.clouds.aib.targets import check_source_security, check_targets
from activities.clouds.aib.versions import version_key
from activities.clouds.append_log import AppendLog
from activities.clouds.azure import storage
from activities.clouds.azure.clients import PUBLIC_ARM, ArmClients, BlobClients, is_loopback_http
from activities.clouds.azure.distribute import AzureDistribution
from activities.clouds.azure.errors import arm_call
from activities.clouds.azure.galleries import AzureGalleries, security_type
from activities.clouds.azure.inventory import Inventory
from activities.clouds.azure.names import (
    LOGS_CONTAINER,
    STAGING_CONTAINER,
    TAG_GENERATION,
    VmParts,
    data_snapshot_name,
    snapshot_name,
    storage_account_name,
)
from activities.clouds.azure.run_command import RunCommandSession
from activities.clouds.azure.vm import (
    IN_USE_WAIT,
    SSH_PORT,
    WINRM_HTTPS_PORT,
    AzureVms,
    image_reference,
    lro,
)
from activities.clouds.azure.waits import Backoff
from activities.clouds.base import LogSink, PermanentError, Progress
from activities.guest.keys import derive_key, public_line, windows_password
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
    ManagedImageDistributor,
    ManagedImageSource,
    PlatformImageSource,
    SharedImageVersionSource,
)

log = logging.getLogger("kiln.azure")

ANY_SOURCE = "*"


def _default_endpoint(vm_id: str, address: str, port: int) -> tuple[str, int]:
    return address, port


def _trusted_launch(resource: Any) -> bool:
    """Whether a VM, or a snapshot of its disk, is of security type TrustedLaunch."""
    profile = resource.security_profile
    return profile is not None and (profile.security_type or "").lower() == "trustedlaunch"


def _account_key(credential: Any) -> str | None:
    """A storage emulator's account key, when that is what the blob clients sign with (``{"account_key": ...}``)."""
    return credential.get("account_key") if isinstance(credential, dict) else None


def _account_url(value: str) -> str:
    """A storage account's blob endpoint from its name or from the endpoint itself."""
    if "://" in value:
        return value.rstrip("/") + "/"
    return f"https://{value}.blob.core.windows.net/"


class AzureCloud:
    """The ``Cloud`` on Azure. One instance per worker; its clients are shared by every build the worker runs."""

    name = "azure"

    def __init__(
        self,
        credential: Any,
        subscription_id: str,
        *,
        arm_endpoint: str = PUBLIC_ARM,
        client_options: dict[str, Any] | None = None,
        blob_credential: Any | None = None,
        secret: bytes,
        egress_ip: str | None = None,
        allow_any_source: bool = False,
        log_account: str | None = None,
        guest_endpoint: Callable[[str, str, int], tuple[str, int]] | None = None,
        conflict_backoff: float = 3.0,
        in_use_wait: float = IN_USE_WAIT,
        poll: Backoff | None = None,
    ) -> None:
        """``credential`` is an async token credential. ``blob_credential`` is what the blob clients
        authenticate with: by default the same Entra credential (staging accounts allow no shared keys); tests
        pass a storage emulator's account key instead, since an emulator takes nothing else.
        ``guest_endpoint(vm_id, address, port)`` maps a VM's address to where the worker connects; the default is
        the address itself. ``client_options`` go to every management client (transport, policies, retries).
        ``conflict_backoff`` is the first pause before a call that met a resource still in use (or a NIC Azure
        still reserves) is made again, for up to ``in_use_wait`` seconds. ``poll`` paces the looks at copies no
        long-running operation covers (see ``waits``)."""
        self.subscription_id = subscription_id
        self.arm = ArmClients(credential, subscription_id, arm_endpoint=arm_endpoint, options=client_options)
        self.blobs = BlobClients(blob_credential if blob_credential is not None else credential)
        self._blob_credential = blob_credential
        self._credential = credential
        self.secret = secret
        # Where the NSG admits SSH and WinRM from: the worker's egress address, or any source when the
        # worker's operator said so; with neither, builds that need the NSG are refused at resolve source.
        self._nsg_source = egress_ip or (ANY_SOURCE if allow_any_source else None)
        self._log_account_url = _account_url(log_account) if log_account else None
        self.vms = AzureVms(
            self.arm,
            egress_source=self._egress_source,
            guest_endpoint=guest_endpoint or _default_endpoint,
            conflict_backoff=conflict_backoff,
            in_use_wait=in_use_wait,
        )
        self.galleries = AzureGalleries(self.arm)
        self.inventory = Inventory(self.arm, self.vms)
        self.distribution = AzureDistribution(
            self.arm,
            self.blobs,
            self.vms,
            galleries=self.galleries,
            output_account=self._output_account,
            poll=poll or Backoff(),
        )

    @classmethod
    def from_environment(
        cls, *, allow_any_source: bool = False, client_options: dict[str, Any] | None = None
    ) -> AzureCloud:
        """The cloud the environment describes (see the package docstring); ``allow_any_source`` and
        ``client_options`` are as in the constructor."""
        from azure.identity.aio import DefaultAzureCredential

        from activities.clouds.state import worker_secret

        subscription = os.environ.get("AZURE_SUBSCRIPTION_ID")
        if not subscription:
            raise SystemExit("AZURE_SUBSCRIPTION_ID is not set: kiln needs the subscription to build in")
        endpoint = os.environ.get("KILN_ARM_ENDPOINT") or PUBLIC_ARM
        if endpoint.startswith("http://") and not is_loopback_http(endpoint):
            raise SystemExit(f"KILN_ARM_ENDPOINT {endpoint}: tokens go over https only (or to a loopback emulator)")
        secret_hex = os.environ.get("KILN_WORKER_SECRET")
        return cls(
            DefaultAzureCredential(),
            subscription,
            arm_endpoint=endpoint,
            secret=bytes.fromhex(secret_hex) if secret_hex else worker_secret(),
            egress_ip=os.environ.get("KILN_EGRESS_IP") or None,
            allow_any_source=allow_any_source,
            log_account=os.environ.get("KILN_LOG_ACCOUNT") or None,
            client_options=client_options,
        )

    async def close(self) -> None:
        await self.arm.close()
        await self.blobs.close()
        if hasattr(self._credential, "close"):
            await self._credential.close()

    async def _egress_source(self) -> str:
        """The NSG's source prefix (resolve source refused the build if there is none)."""
        assert self._nsg_source is not None, "resolve source admits no build without an NSG source"
        return self._nsg_source

    def _check_inbound(self, template: ImageTemplate) -> None:
        """A build VM with a public IP is reachable only from the worker's address: refuse the build, before
        anything is made, when that address is unknown and the worker was not told to admit any source."""
        vnet = template.properties.vm_profile.vnet_config
        if self._nsg_source is not None or (vnet is not None and vnet.subnet_id):
            return
        raise PermanentError(
            "properties.vmProfile.vnetConfig: the build VM would get a public IP whose SSH and WinRM ports are open "
            "to the internet, since this worker does not know its own egress address. Either set KILN_EGRESS_IP on "
            "the worker (its NSG then admits only that address), or give vmProfile.vnetConfig.subnetId, a subnet the "
            "worker reaches privately. (A worker started with --allow-any-source admits any source.)",
            kind="InboundOpenToInternet",
        )

    # ---- source

    async def resolve_source(self, build: BuildContext, template: ImageTemplate) -> ResolvedSource:
        self._check_inbound(template)
        source = template.properties.source
        if isinstance(source, PlatformImageSource):
            resolved = await self._resolve_platform(build, source)
        elif isinstance(source, ManagedImageSource):
            resolved = await self._resolve_managed(source)
        else:
            assert isinstance(source, SharedImageVersionSource)
            resolved = await self._resolve_gallery(source)
        build_security = await check_targets(template, resolved, galleries=self.galleries)
        self._check_data_disks(template)
        return resolved.model_copy(update={"build_security_type": build_security})

    @staticmethod
    def _check_data_disks(template: ImageTemplate) -> None:
        """A managed image target with additionalDataDisks must be in the build's region: the copy to another
        region is of the OS disk's snapshot alone."""
        if not template.properties.additional_data_disks:
            return
        for index, target in enumerate(template.properties.distribute):
            if isinstance(target, ManagedImageDistributor) and region_key(target.location) != region_key(
                template.location
            ):
                raise PermanentError(
                    f"properties.distribute[{index}].location: kiln does not yet copy data disks to another "
                    f"region; a ManagedImage target with additionalDataDisks must be in {template.location}",
                    kind="BadDataDisk",
                )

    async def _resolve_platform(self, build: BuildContext, source: PlatformImageSource) -> ResolvedSource:
        images = self.arm.compute.virtual_machine_images
        label = f"{source.publisher}:{source.offer}:{source.sku}:{source.version}"
        needs = "Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read"
        version = source.version
        async with arm_call(f"properties.source ({label})", needs=needs):
            try:
                if version.lower() == "latest":
                    listed = await images.list(build.location, source.publisher, source.offer, source.sku)
                    if not listed:
                        raise ResourceNotFoundError("no versions")
                    version = max((i.name for i in listed), key=version_key)
                image = await images.get(build.location, source.publisher, source.offer, source.sku, version)
            except ResourceNotFoundError as err:
                raise PermanentError(
                    f"properties.source: the platform image {label} does not exist in {build.location}",
                    kind="SourceImageNotFound",
                ) from err
        if image.plan is not None and source.plan_info is None:
            raise PermanentError(
                f"properties.source: {label} is a marketplace image with a purchase plan "
                f"({image.plan.publisher}/{image.plan.product}/{image.plan.name}); give it in properties.source.planInfo",
                kind="PlanInfoRequired",
            )
        security = security_type(image.features)
        check_source_security(security, field="properties.source", image=label)
        os_disk = image.os_disk_image
        return ResolvedSource(
            image_id=platform_image_id(
                self.subscription_id, build.location, source.publisher, source.offer, source.sku, version
            ),
            exact_version=version,
            os_type="Windows" if os_disk is not None and os_disk.operating_system == "Windows" else "Linux",
            hyper_v_generation="V2" if image.hyper_v_generation == "V2" else "V1",
            security_type=security,
        )

    async def _resolve_managed(self, source: ManagedImageSource) -> ResolvedSource:
        ref = resource_id(source.image_id, field="properties.source.imageId")
        async with arm_call(f"properties.source.imageId {source.image_id}", needs="Microsoft.Compute/images/read"):
            try:
                image = await self.arm.compute.images.get(ref.group, ref.name)
            except ResourceNotFoundError as err:
                raise PermanentError(
                    f"properties.source.imageId: the managed image {source.image_id} does not exist",
                    kind="SourceImageNotFound",
                ) from err
        os_disk = image.storage_profile.os_disk if image.storage_profile else None
        return ResolvedSource(
            image_id=image.id,
            exact_version="",
            os_type="Windows" if os_disk is not None and os_disk.os_type == "Windows" else "Linux",
            hyper_v_generation="V2" if image.hyper_v_generation == "V2" else "V1",
            size_bytes=(os_disk.disk_size_gb or 0) << 30 if os_disk is not None else 0,
        )

    async def _resolve_gallery(self, source: SharedImageVersionSource) -> ResolvedSource:
        field = "properties.source.imageVersionId"
        ref = resource_id(source.image_version_id, field=field)
        if not ref.is_a(COMPUTE, "galleries", "images", "versions"):
            raise PermanentError(
                f"{field}: shared and community gallery sources are not supported yet; give a gallery image version "
                "id in a subscription",
                kind="UnsupportedSource",
            )
        gallery, definition, version = ref.path[1::2]
        versions = self.arm.compute.gallery_image_versions
        async with arm_call(
            f"{field} {source.image_version_id}", needs="Microsoft.Compute/galleries/images/versions/read"
        ):
            try:
                image = await self.arm.compute.gallery_images.get(ref.group, gallery, definition)
                if version.lower() == "latest":
                    candidates = [
                        v.name
                        async for v in versions.list_by_gallery_image(ref.group, gallery, definition)
                        if v.provisioning_state == "Succeeded"
                        and not (v.publishing_profile and v.publishing_profile.exclude_from_latest)
                    ]
                    if not candidates:
                        raise ResourceNotFoundError("no versions")
                    version = max(candidates, key=version_key)
                found = await versions.get(ref.group, gallery, definition, version)
            except ResourceNotFoundError as err:
                raise PermanentError(
                    f"{field}: {source.image_version_id} does not exist (or has no version that 'latest' can mean)",
                    kind="SourceImageNotFound",
                ) from err
        security = security_type(image.features)
        check_source_security(security, field=field, image=source.image_version_id)
        return ResolvedSource(
            image_id=found.id,
            exact_version=version,
            os_type="Windows" if image.os_type == "Windows" else "Linux",
            hyper_v_generation="V2" if image.hyper_v_generation == "V2" else "V1",
            revoked=(found.tags or {}).get(TAG_REVOKED, ""),
            security_type=security,
        )

    # ---- gallery versions' lifecycle

    def _version_ref(self, version_id: str) -> tuple[str, str, str, str]:
        ref = resource_id(version_id, field="version")
        if not ref.is_a(COMPUTE, "galleries", "images", "versions"):
            raise PermanentError(f"{version_id} is not a gallery image version id", kind="ImageVersionNotFound")
        gallery, definition, version = ref.path[1::2]
        return ref.group, gallery, definition, version

    async def retire_image_version(
        self, version_id: str, *, end_of_life: datetime, exclude_from_latest: bool, revoked: str = ""
    ) -> None:
        group, gallery, definition, version = self._version_ref(version_id)
        versions = self.arm.compute.gallery_image_versions
        async with arm_call(
            f"gallery image version {version_id}", needs="Microsoft.Compute/galleries/images/versions/write"
        ):
            try:
                found = await versions.get(group, gallery, definition, version)
            except ResourceNotFoundError as err:
                raise PermanentError(f"{version_id} does not exist", kind="ImageVersionNotFound") from err
            profile: dict[str, Any] = {"endOfLifeDate": end_of_life.isoformat()}
            if exclude_from_latest:
                profile["excludeFromLatest"] = True
            tags = {**(found.tags or {}), **({TAG_REVOKED: revoked} if revoked else {})}
            poller = await versions.begin_update(
                group, gallery, definition, version, {"tags": tags, "properties": {"publishingProfile": profile}}
            )
            await poller.result()

    async def delete_image_version(self, version_id: str) -> None:
        group, gallery, definition, version = self._version_ref(version_id)
        async with arm_call(
            f"gallery image version {version_id}", needs="Microsoft.Compute/galleries/images/versions/delete"
        ):
            try:
                poller = await self.arm.compute.gallery_image_versions.begin_delete(group, gallery, definition, version)
                await poller.result()
            except ResourceNotFoundError:
                pass

    # ---- staging

    async def create_staging(self, build: BuildContext) -> Staging:
        group = staging_group(build, subscription=self.subscription_id)
        tags = build_tags(build, role=ROLE_TEMPORARY)
        created = await self._ensure_group(build, group.name, user_given=group.user_given, tags=tags)
        account = storage_account_name(build.build_id)
        async with arm_call(f"staging storage account {account}", needs="Microsoft.Storage/storageAccounts/write"):
            made = await lro(
                self.arm.storage.storage_accounts.begin_create(
                    group.name,
                    account,
                    {
                        "location": build.location,
                        "tags": tags,
                        "sku": {"name": "Standard_LRS"},
                        "kind": "StorageV2",
                        "properties": {
                            "allowSharedKeyAccess": False,
                            "allowBlobPublicAccess": False,
                            "minimumTlsVersion": "TLS1_2",
                        },
                    },
                )
            )
        blob_endpoint = made.primary_endpoints.blob
        container_url = f"{blob_endpoint.rstrip('/')}/{STAGING_CONTAINER}"
        logs_url = f"{(self._log_account_url or blob_endpoint).rstrip('/')}/{LOGS_CONTAINER}"
        await storage.ensure_container(self.blobs, container_url)
        await storage.ensure_container(self.blobs, logs_url)
        resources = [Resource(id=made.id, kind="storageAccount", owner="staging")]
        if created:
            resources.insert(0, Resource(id=group.id, kind="resourceGroup", owner="staging"))
        return Staging(
            resource_group_id=group.id,
            created_group=created,
            storage_uri=container_url,
            log_uri_prefix=f"{logs_url}/{build.build_id}/",
            resources=resources,
        )

    async def _ensure_group(self, build: BuildContext, name: str, *, user_given: bool, tags: dict[str, str]) -> bool:
        """Create the staging group, or check the one the template names. True when kiln made it (now or on an
        earlier try of this build), which is what allows deleting it at cleanup."""
        groups = self.arm.resource.resource_groups
        field = "properties.stagingResourceGroup"
        async with arm_call(
            f"staging resource group {name}", needs="Microsoft.Resources/subscriptions/resourceGroups/write"
        ):
            try:
                existing = await groups.get(name)
            except ResourceNotFoundError:
                existing = None
            if existing is None:
                await groups.create_or_update(name, {"location": build.location, "tags": tags})
                return True
            if (existing.tags or {}).get(TAG_BUILD_ID) == build.build_id:
                return True
            if not user_given:
                raise PermanentError(
                    f"the staging resource group {name} exists and was not made by this build", kind="StagingGroupTaken"
                )
            others = await self.inventory.others(name, build.build_id)
        if others:
            raise PermanentError(
                f"{field}: the resource group {existing.id} must be empty when the build starts, "
                f"but holds {len(others)} resource(s), such as {others[0]}",
                kind="StagingGroupNotEmpty",
            )
        return False

    async def delete_staging(self, build: BuildContext) -> None:
        """Delete the staging group when kiln made it, else only kiln's resources in it. When the logs live in the
        staging account (no log account configured), that account and so its group are kept."""
        await self._delete_staging_group(staging_group(build, subscription=self.subscription_id).name, build.build_id)

    async def delete_tagged(self, build_id: str) -> list[str]:
        """Everything temporary a build makes lives in its staging group (outputs and logs live elsewhere, or in
        the staging account, which is then kept), so the sweep deletes in each group that carries the build's id
        what ``delete_staging`` deletes. A stagingResourceGroup the template gave carries no build id and is not
        found by tag: the build's own undos, and the janitor's run of them, are what clean it."""
        tagged = self.arm.resource.resource_groups.list(
            filter=f"tagName eq '{TAG_BUILD_ID}' and tagValue eq '{build_id}'"
        )
        return [deleted async for group in tagged for deleted in await self._delete_staging_group(group.name, build_id)]

    async def _delete_staging_group(self, name: str, build_id: str) -> list[str]:
        """Delete build ``build_id``'s staging group ``name`` as ``delete_staging`` does; the ids deleted."""
        groups = self.arm.resource.resource_groups
        try:
            existing = await groups.get(name)
        except ResourceNotFoundError:
            return []
        logs_here = self._log_account_url is None
        if (existing.tags or {}).get(TAG_BUILD_ID) == build_id and not logs_here:
            await self.vms.delete(
                f"staging resource group {name}",
                "Microsoft.Resources/subscriptions/resourceGroups",
                lambda: groups.begin_delete(name),
            )
            return [existing.id]
        # Whatever the saga's own undos did not get (a half-made create whose undo was lost).
        return await self.inventory.delete_build(name, build_id, keep_storage=logs_here)

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact:
        return await storage.stage(self.blobs, staging.storage_uri, build.build_id, artifact, data)

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes:
        return await storage.read(self.blobs, staged.staged_uri)

    async def read_url(self, build: BuildContext, staged: StagedArtifact) -> str:
        return await storage.read_url(self.blobs, staged.staged_uri, account_key=_account_key(self._blob_credential))

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> LogSink:
        blob = self.blobs.blob(f"{staging.log_uri_prefix}{name}")
        return await AppendLog.open(blob, metadata=blob_metadata(build.build_id))

    async def _output_account(self, build: BuildContext) -> str:
        """Where a VHD output without ``uri`` goes: the log account, else the staging account (kept then)."""
        if self._log_account_url:
            return self._log_account_url
        group = staging_group(build, subscription=self.subscription_id).name
        account = await self.arm.storage.storage_accounts.get_properties(group, storage_account_name(build.build_id))
        return account.primary_endpoints.blob

    # ---- build VM

    async def create_vm(self, build: BuildContext, staging: Staging, spec: VmSpec) -> BuildVm:
        """Create-or-get the VM and its parts (names from the VM name), then learn its address and host key."""
        group = staging_group(build, subscription=self.subscription_id).name
        parts = VmParts(spec.name)
        source = spec.source
        tags = {**build_tags(build, role=ROLE_TEMPORARY), TAG_GENERATION: source.hyper_v_generation}
        vnet = spec.vm_profile.vnet_config
        subnet_id = vnet.subnet_id if vnet is not None and vnet.subnet_id else None
        nic, made = await self.vms.create_network(group, parts, location=build.location, tags=tags, subnet_id=subnet_id)
        user = admin_user_of(build.build_id)
        windows = source.os_type == "Windows"
        client_key = derive_key(self.secret, build.build_id, "client")
        vm = await self.vms.create_vm(
            group,
            parts,
            location=build.location,
            tags=tags,
            nic_id=nic.id,
            image_reference=image_reference(spec.image_id),
            plan=await self._plan_of(spec.image_id),
            os_type=source.os_type,
            generation=source.hyper_v_generation,
            vm_size=spec.vm_profile.vm_size,
            os_disk_size_gb=spec.vm_profile.os_disk_size_gb,
            data_disk_sizes_gb=spec.data_disk_sizes_gb,
            security_type=spec.security_type,
            identities=spec.vm_profile.user_assigned_identities,
            admin_user=user,
            ssh_public_key=None if windows else public_line(client_key),
            password=windows_password(self.secret, build.build_id) if windows else None,
        )
        address = await self.vms.address_of(group, parts, public=subnet_id is None)
        if windows:
            host_key = await self.vms.enable_winrm(group, parts.vm)
        else:
            host_key = await self.vms.read_host_key(group, parts.vm)
        host, port = self.vms.endpoint(vm.id, address, WINRM_HTTPS_PORT if windows else SSH_PORT)
        os_disk = vm.storage_profile.os_disk.managed_disk.id if vm.storage_profile else None
        resources = [Resource(id=rid, kind=kind, owner=spec.name) for rid, kind in made]
        resources.append(Resource(id=vm.id, kind="virtualMachine", owner=spec.name))
        if os_disk:
            resources.append(Resource(id=os_disk, kind="disk", owner=spec.name))
        for data in vm.storage_profile.data_disks or [] if vm.storage_profile else []:
            if data.managed_disk is not None and data.managed_disk.id:
                resources.append(Resource(id=data.managed_disk.id, kind="disk", owner=spec.name))
        return BuildVm(
            name=spec.name,
            host=host,
            port=port,
            admin_user=user,
            host_key=host_key,
            os_type=source.os_type,
            resources=resources,
        )

    async def _plan_of(self, image_id: str) -> dict[str, str] | None:
        """The purchase plan a marketplace image needs on the VM (resolve_source checked planInfo names it)."""
        platform = parse_platform_image_id(image_id)
        if platform is None:
            return None
        image = await self.arm.compute.virtual_machine_images.get(
            platform.location, platform.publisher, platform.offer, platform.sku, platform.version
        )
        if image.plan is None:
            return None
        return {"name": image.plan.name, "product": image.plan.product, "publisher": image.plan.publisher}

    async def delete_vm(self, build: BuildContext, name: str) -> None:
        await self.vms.delete_vm_parts(staging_group(build, subscription=self.subscription_id).name, VmParts(name))

    @asynccontextmanager
    async def agent_session(self, build: BuildContext, vm: BuildVm) -> AsyncIterator[RunCommandSession]:
        if vm.os_type != "Linux":
            raise PermanentError(
                f"VM {vm.name} is no Linux VM Run Command takes shell scripts on", kind="NoAgentSession"
            )
        yield RunCommandSession(self.arm, staging_group(build, subscription=self.subscription_id).name, vm.name)

    # ---- capture

    async def capture_image(
        self, build: BuildContext, staging: Staging, vm: BuildVm, spec: CaptureSpec
    ) -> CapturedImage:
        """Deallocate and generalize the VM, then snapshot its OS disk (and each data disk) and, of a Standard VM,
        make a managed image, which holds the data disks too. The image makes validation VMs and gallery versions;
        the snapshots are what a VHD is exported from and ManagedImage targets are made of. A TrustedLaunch VM gets
        no managed image (Azure makes none of it): its snapshots make the gallery versions, and nothing else needs
        one (``aib.targets.build_security``). A retry after success finds them all and returns them."""
        group = staging_group(build, subscription=self.subscription_id).name
        compute = self.arm.compute
        snap_name = snapshot_name(spec.name)
        if (before := await self._captured_before(group, spec.name)) is not None:
            return before
        try:
            machine = await compute.virtual_machines.get(group, vm.name)
        except ResourceNotFoundError as err:
            raise PermanentError(f"there is no VM {vm.name} in {group} to capture", kind="VmNotFound") from err
        generation = (machine.tags or {}).get(TAG_GENERATION, "V1")
        os_disk = machine.storage_profile.os_disk
        async with arm_call(
            f"VM {vm.name}",
            needs="Microsoft.Compute/virtualMachines/deallocate/action, "
            "Microsoft.Compute/virtualMachines/generalize/action",
        ):
            await lro(compute.virtual_machines.begin_deallocate(group, vm.name))
            await compute.virtual_machines.generalize(group, vm.name)
        snapshot = await self._snapshot(
            build,
            group,
            snap_name,
            os_disk.managed_disk.id,
            os_type=os_disk.os_type or vm.os_type,
            generation=generation,
        )
        data = [
            await self._snapshot(build, group, data_snapshot_name(spec.name, d.lun), d.managed_disk.id)
            for d in machine.storage_profile.data_disks or []
        ]
        if _trusted_launch(machine):
            return self._captured(None, snapshot, data)
        async with arm_call(f"image {spec.name}", needs="Microsoft.Compute/images/write"):
            image = await lro(
                compute.images.begin_create_or_update(
                    group,
                    spec.name,
                    {
                        "location": build.location,
                        "tags": build_tags(build, role=ROLE_TEMPORARY),
                        "properties": {"sourceVirtualMachine": {"id": machine.id}, "hyperVGeneration": generation},
                    },
                )
            )
        return self._captured(image, snapshot, data)

    async def _captured_before(self, group: str, name: str) -> CapturedImage | None:
        """What an earlier try of this capture finished, if it finished: the snapshots, and the managed image unless
        the OS disk's snapshot is of a TrustedLaunch VM."""
        compute = self.arm.compute
        try:
            snapshot = await compute.snapshots.get(group, snapshot_name(name))
            image = None if _trusted_launch(snapshot) else await compute.images.get(group, name)
        except ResourceNotFoundError:
            return None
        data = await self._data_snapshots(group, name)
        if all(r.provisioning_state == "Succeeded" for r in (snapshot, *data, *([image] if image else []))):
            return self._captured(image, snapshot, data)
        return None

    async def _data_snapshots(self, group: str, name: str) -> list[Any]:
        """The data disk snapshots of capture ``name``, by LUN (kiln's data disks are at LUN 0, 1...)."""
        found = []
        while True:
            try:
                found.append(await self.arm.compute.snapshots.get(group, data_snapshot_name(name, len(found))))
            except ResourceNotFoundError:
                return found

    async def _snapshot(
        self,
        build: BuildContext,
        group: str,
        name: str,
        disk_id: str,
        *,
        os_type: str | None = None,
        generation: str | None = None,
    ) -> Any:
        """An incremental snapshot of a disk of the build VM (its OS disk with ``os_type`` and ``generation``)."""
        properties: dict[str, Any] = {
            "creationData": {"createOption": "Copy", "sourceResourceId": disk_id},
            # Only an incremental snapshot can be copied to another region (CopyStart), which a ManagedImage
            # target elsewhere needs.
            "incremental": True,
        }
        if os_type is not None:
            properties.update(osType=os_type, hyperVGeneration=generation)
        # Copying the disk is authorized on the disk too (a linked check): beginGetAccess on it.
        async with arm_call(
            f"snapshot {name}",
            needs="Microsoft.Compute/snapshots/write, and Microsoft.Compute/disks/beginGetAccess/action on the "
            "build VM's disks",
        ):
            return await lro(
                self.arm.compute.snapshots.begin_create_or_update(
                    group,
                    name,
                    {
                        "location": build.location,
                        "tags": build_tags(build, role=ROLE_TEMPORARY),
                        "sku": {"name": "Standard_LRS"},
                        "properties": properties,
                    },
                )
            )

    @staticmethod
    def _captured(image: Any | None, snapshot: Any, data: list[Any]) -> CapturedImage:
        size_gb = snapshot.disk_size_gb or 0
        made = image if image is not None else snapshot
        return CapturedImage(
            # The managed image, or (of a TrustedLaunch VM) the OS disk's snapshot, which gallery versions take.
            id=made.id,
            # The OS-disk snapshot: what a VHD output is exported from.
            uri=snapshot.id,
            size_bytes=size_gb << 30,
            hyper_v_generation="V2" if made.hyper_v_generation == "V2" else "V1",
            data_disk_snapshots=[d.id for d in data],
            resources=[
                *([Resource(id=image.id, kind="image")] if image is not None else []),
                Resource(id=snapshot.id, kind="snapshot"),
                *(Resource(id=d.id, kind="snapshot") for d in data),
            ],
        )

    async def delete_image(self, build: BuildContext, name: str) -> None:
        group = staging_group(build, subscription=self.subscription_id).name
        compute = self.arm.compute
        for data in await self._data_snapshots(group, name):
            await self.vms.delete(
                f"snapshot {data.name}",
                "Microsoft.Compute/snapshots",
                lambda data=data: compute.snapshots.begin_delete(group, data.name),
            )
        await self.vms.delete(
            f"image {name}", "Microsoft.Compute/images", lambda: compute.images.begin_delete(group, name)
        )
        snap = snapshot_name(name)
        await self.vms.delete(
            f"snapshot {snap}", "Microsoft.Compute/snapshots", lambda: compute.snapshots.begin_delete(group, snap)
        )

    # ---- distribution

    async def distribute(
        self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress: Progress
    ) -> RunOutput:
        return await self.distribution.distribute(request, resume=resume, progress=progress)

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        await self.distribution.delete_output(build, target, index)
