"""GET /v1/models: the models live workers serve now, in OpenAI's shape."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from api.auth import authenticate
from api.catalog import no_such_model
from api.deps import GatewayDep
from api.openapi import ERRORS
from shared.schema import ModelCard, ModelList

router = APIRouter(responses=ERRORS, dependencies=[Depends(authenticate)])
_STARTED = int(time.time())


def model_card(name: str) -> ModelCard:
    return ModelCard(id=name, created=_STARTED, owned_by="sluice")


@router.get("/v1/models")
async def list_models(gateway: GatewayDep) -> ModelList:
    return ModelList(data=[model_card(m.name) for m in await gateway.models.served()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, gateway: GatewayDep) -> ModelCard:
    if model_id not in {m.name for m in await gateway.models.served()}:
        raise no_such_model(model_id)
    return model_card(model_id)
