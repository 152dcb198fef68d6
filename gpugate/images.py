"""Image pins: a digest is either real (traceable, say where from in a comment) or marked as a placeholder.

A placeholder digest is `sha256:` followed by one hex digit repeated 64 times (`sha256:000...0`): no
registry serves it, it survives rendering into the objects the policy pack judges, and a reader sees at a
glance that it is not a pin. The policy pack (`images-pinned`) and `gpugate promote` refuse placeholders and
tags without a digest; `gpugate validate` warns.
"""

from __future__ import annotations

import re

from gpugate.spec import GatewaySpec

PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
_DIGEST = re.compile(r"@sha256:([0-9a-f]{64})$")
ALLOWED = "repo@sha256:<64 hex> of a published image (not a tag, not a placeholder digest of one repeated digit)"


def image_problem(ref: str) -> str | None:
    """Why `ref` is not a deployable pin, or None: a tag without a digest, or a placeholder digest."""
    found = _DIGEST.search(ref)
    if found is None:
        return f"{ref} is not pinned by digest"
    if len(set(found.group(1))) == 1:
        return f"{ref} has a placeholder digest"
    return None


def is_placeholder(ref: str) -> bool:
    found = _DIGEST.search(ref)
    return found is not None and len(set(found.group(1))) == 1


def stack_images(spec: GatewaySpec) -> list[tuple[str, str]]:
    """(stack field, image reference) for every image the stack pins."""
    images = []
    if spec.vllm.image is not None:
        images.append(("gpugate:vllm.image", spec.vllm.image))
    if spec.kubernetes is not None:
        for name, ref in spec.kubernetes.images.model_dump().items():
            if ref is not None:
                images.append((f"gpugate:kubernetes.images.{name}", ref))
    return images


def image_problems(spec: GatewaySpec) -> list[tuple[str, str]]:
    """(stack field, problem) for every image of the stack that may not be deployed."""
    return [(field, problem) for field, ref in stack_images(spec) if (problem := image_problem(ref)) is not None]
