"""Loading and unloading LoRA adapters while the server runs, with vLLM's routes and fields (admin keys only).

    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": DIR[, "load_inplace": true]}  -> its model card
    POST /v1/unload_lora_adapter  {"lora_name": NAME}  -> {"id": NAME, "object": "model", "deleted": true}

A loaded adapter is a model of /v1/models at once, and requests may name it from the next engine step on.
`load_inplace` replaces the weights of an adapter loaded under that name (as vLLM's, e.g. after an RL step). Unloading
or replacing an adapter that unfinished requests still use is refused (409 `adapter_in_use`): nothing is cut short,
and the caller retries once they are done. A server without API keys answers them as it answers the rest: to loopback
JSON requests only (serve/access.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from seekstack.adapters.registry import AdapterConflict, AdapterInUse, UnknownAdapter
from seekstack.checkpoint import CheckpointError
from seekstack.schema import ConfigError, option_name, shown_value
from seekstack.serve.access import read_body
from seekstack.serve.errors import APIError, parse_body
from seekstack.serve.openapi import error_responses, json_request
from seekstack.serve.schemas import ModelCard

if TYPE_CHECKING:
    from seekstack.serve.app import Server


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)  # the model id requests will use
    # the adapter folder (adapter_config.json, adapter_model.safetensors), on the server's disk; ~ is its user's home
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # a loaded `lora_name` takes the new weights (else 409 adapter_exists)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's request has it and unloads by lora_name alone, as here


def add_adapter_routes(app: FastAPI, server: Server) -> None:
    """The two admin routes that change which adapters `server` serves."""

    @app.post(
        "/v1/load_lora_adapter",
        openapi_extra=json_request(LoadAdapterRequest, inline=True),
        response_model=ModelCard,
        responses=error_responses(400, 401, 403, 409, 413),
    )
    async def load_lora_adapter(request: Request) -> JSONResponse:
        """Serve the LoRA adapter in `lora_path` as model `lora_name`, or with `load_inplace` replace the weights of
        the one loaded as `lora_name` (admin keys only)."""
        await asyncio.to_thread(server.authenticate, request, True)
        raw = await read_body(request, server.max_body_bytes)
        body = await asyncio.to_thread(parse_body, LoadAdapterRequest, raw)  # JSON: off the event loop
        if body.lora_name == server.model_name:
            raise APIError(409, f"{body.lora_name!r} is the base model's name; give the adapter another one",
                           param="lora_name", code="adapter_exists")  # fmt: skip
        try:
            # a leading ~: the server user's home (Engine.load_adapter reads it so)
            await asyncio.to_thread(server.engine.load_adapter, body.lora_name, body.lora_path, body.load_inplace)
        except AdapterInUse as error:
            raise APIError(409, str(error), param="lora_name", code="adapter_in_use") from None
        except AdapterConflict as error:
            raise APIError(409, str(error), param="lora_name", code="adapter_exists") from None
        except CheckpointError as error:
            raise APIError(400, str(error), param="lora_path", code="invalid_adapter") from None
        except OSError as error:  # a path the system refuses to read: a name too long, a folder it may not enter
            raise APIError(400, f"lora_path {shown_value(body.lora_path)} cannot be read: {error.strerror or error}",
                           param="lora_path", code="invalid_adapter") from None  # fmt: skip
        except ConfigError as error:  # past the capacity serve was started with: named as its option (if of one)
            said = error.naming(f"this server's {option_name(error.field)}") if error.field else str(error)
            param = "lora_name" if error.field == "max_loras" else "lora_path"  # slots hold names; a rank, a path's
            raise APIError(400, said, param=param, code="invalid_value") from None
        except ValueError as error:
            raise APIError(400, str(error), param="lora_name", code="invalid_value") from None
        [card] = [card for card in server.models().data if card.id == body.lora_name]
        return JSONResponse(card.model_dump())

    @app.post(
        "/v1/unload_lora_adapter",
        openapi_extra=json_request(UnloadAdapterRequest, inline=True),
        responses=error_responses(400, 401, 403, 404, 409, 413),
    )
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        """Stop serving adapter `lora_name`; refused while unfinished requests use it (admin keys only)."""
        await asyncio.to_thread(server.authenticate, request, True)
        raw = await read_body(request, server.max_body_bytes)
        body = await asyncio.to_thread(parse_body, UnloadAdapterRequest, raw)  # JSON: off the event loop
        try:
            await asyncio.to_thread(server.engine.unload_adapter, body.lora_name)
        except UnknownAdapter as error:
            raise APIError(404, str(error), param="lora_name", code="model_not_found") from None
        except AdapterInUse as error:
            raise APIError(409, str(error), param="lora_name", code="adapter_in_use") from None
        return JSONResponse({"id": body.lora_name, "object": "model", "deleted": True})
