"""GET /v1/models: the model this deployment serves, in OpenAI's shape."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from api.auth import authenticate
from api.deps import SettingsDep
from api.openapi import ERRORS
from shared.errors import ModelNotFound
from shared.schema import ModelCard, ModelList

router = APIRouter(responses=ERRORS, dependencies=[Depends(authenticate)])
_STARTED = int(time.time())


def model_card(name: str) -> ModelCard:
    return ModelCard(id=name, created=_STARTED, owned_by="sluice")


@router.get("/v1/models")
async def list_models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[model_card(settings.model_name)])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, settings: SettingsDep) -> ModelCard:
    if model_id != settings.model_name:
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")
    return model_card(model_id)
