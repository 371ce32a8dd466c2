"""What kubelet asks of a CRI runtime, reduced to what the tests need: a pod
sandbox and containers in it, made through the CRI gRPC API with the labels
kubelet sets, so vajrad sees them as it would on a Kubernetes node. Messages
are built with vajrad's own protobuf wire codec (vajrad/enrich/protowire.py)
from the field numbers of kubernetes/cri-api's runtime/v1 api.proto."""
from __future__ import annotations

import grpc

from vajrad.enrich import protowire as pw

SERVICE = "/runtime.v1.RuntimeService/"
NODE, CONTAINER = 2, 1          # NamespaceMode


class CriClient:
    def __init__(self, socket_path: str, timeout: float = 30):
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.timeout = timeout

    def call(self, method: str, request: bytes) -> dict:
        rpc = self.channel.unary_unary(SERVICE + method)
        return pw.parse(rpc(request, timeout=self.timeout))

    def close(self):
        self.channel.close()

    @staticmethod
    def _namespaces() -> bytes:
        # NamespaceOption: network = 1, pid = 2, ipc = 3. The host network:
        # no CNI plugin is needed.
        return pw.uint(1, NODE) + pw.uint(2, CONTAINER) + pw.uint(3, 0)

    def sandbox_config(self, name: str, namespace: str, uid: str, cgroup_parent: str) -> bytes:
        metadata = pw.string(1, name) + pw.string(2, uid) + pw.string(3, namespace)      # PodSandboxMetadata
        labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                  "io.kubernetes.pod.uid": uid}
        # LinuxPodSandboxConfig: cgroup_parent = 1, security_context = 2
        # (LinuxSandboxSecurityContext: namespace_options = 1)
        linux = pw.string(1, cgroup_parent) + pw.message(2, pw.message(1, self._namespaces()))
        # PodSandboxConfig: metadata = 1, labels = 6, linux = 8 (no hostname: the host's UTS namespace)
        return pw.message(1, metadata) + pw.string_map(6, labels) + pw.message(8, linux)

    def run_pod_sandbox(self, config: bytes) -> str:
        # RunPodSandboxRequest: config = 1; response: pod_sandbox_id = 1
        return pw.text(self.call("RunPodSandbox", pw.message(1, config)), 1)

    def create_container(self, sandbox_id: str, sandbox_config: bytes, name: str, image: str,
                         command: list[str], pod: dict) -> str:
        labels = {"io.kubernetes.pod.name": pod["name"], "io.kubernetes.pod.namespace": pod["namespace"],
                  "io.kubernetes.pod.uid": pod["uid"], "io.kubernetes.container.name": name}
        # LinuxContainerConfig: security_context = 2 (LinuxContainerSecurityContext: namespace_options = 3)
        linux = pw.message(2, pw.message(3, self._namespaces()))
        # ContainerConfig: metadata = 1 (name = 1), image = 2 (ImageSpec image = 1),
        # command = 3, labels = 9, linux = 15
        config = (pw.message(1, pw.string(1, name)) + pw.message(2, pw.string(1, image))
                  + pw.repeated_string(3, command) + pw.string_map(9, labels) + pw.message(15, linux))
        # CreateContainerRequest: pod_sandbox_id = 1, config = 2, sandbox_config = 3
        request = pw.string(1, sandbox_id) + pw.message(2, config) + pw.message(3, sandbox_config)
        return pw.text(self.call("CreateContainer", request), 1)

    def start_container(self, cid: str) -> None:
        self.call("StartContainer", pw.string(1, cid))

    def stop_container(self, cid: str) -> None:
        self.call("StopContainer", pw.string(1, cid))          # timeout 0: SIGKILL at once

    def remove_container(self, cid: str) -> None:
        self.call("RemoveContainer", pw.string(1, cid))

    def stop_pod_sandbox(self, sid: str) -> None:
        self.call("StopPodSandbox", pw.string(1, sid))

    def remove_pod_sandbox(self, sid: str) -> None:
        self.call("RemovePodSandbox", pw.string(1, sid))

    def container_state(self, cid: str) -> int:
        # ContainerStatusResponse: status = 1 (ContainerStatus: state = 3)
        return pw.integer(pw.sub(self.call("ContainerStatus", pw.string(1, cid)), 1), 3)
