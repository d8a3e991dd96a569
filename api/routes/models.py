"""GET /v1/models: the model this deployment serves, in OpenAI's shape."""

from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import SettingsDep
from shared.errors import ModelNotFound

router = APIRouter()
_STARTED = int(time.time())


def model_card(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "sluice"}


@router.get("/v1/models")
async def list_models(settings: SettingsDep) -> dict[str, object]:
    return {"object": "list", "data": [model_card(settings.model_name)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, settings: SettingsDep) -> dict[str, object]:
    if model_id != settings.model_name:
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")
    return model_card(model_id)
