"""RemoveImage while a container uses the image: the container keeps its layers."""

from __future__ import annotations

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import Pod
from tests.support.daemon import Daemon
from tests.support.imagebuild import LayerBuilder, busybox_image, push_image
from tests.support.registry import Registry

DATA = b"layer data that must outlive its image\n" * 1000


async def test_removed_image_keeps_running_rootfs(daemon: Daemon, registry: Registry) -> None:
    layer = LayerBuilder().add_dir("data").add_file("data/big", DATA).build()
    image = busybox_image(extra_layers=[layer])
    ref = push_image(registry.host, "test/in-use", "1", image)
    pod = await Pod.start(daemon, ref, "in-use")
    container_id = await pod.run("reader", "sleep 1000", wait_running=True)

    await daemon.images.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
    reply = await daemon.runtime.exec_sync(cri.ExecSyncRequest(
        container_id=container_id, cmd=["wc", "-c", "/data/big"], timeout=10))
    snapshots_while_running = len(list((daemon.root / "snapshots").iterdir()))
    await daemon.runtime.remove_container(cri.RemoveContainerRequest(container_id=container_id))
    snapshots_after = list((daemon.root / "snapshots").iterdir())

    assert reply.exit_code == 0
    assert reply.stdout.split()[0] == str(len(DATA)).encode()
    assert snapshots_while_running == 2
    assert snapshots_after == []
