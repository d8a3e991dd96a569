"""Typed dependencies: what a route may ask for."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.gateway import Gateway


# `async def`, though they await nothing: FastAPI runs plain `def` dependencies in a thread.
async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
