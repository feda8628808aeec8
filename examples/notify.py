"""A backend route in the gateway's own process: POST /notify/{user_id} pushes a message to that user.

Run it with `APP=examples.notify:app ./run dev`, then `curl -X POST localhost:8000/notify/alice -d 'hello'`.
This route has no authentication of its own: it is an example of calling `gateway`, not an API to expose.
"""

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi import create_app
from gateway import gateway


async def notify(request: Request) -> JSONResponse:
    text = (await request.body()).decode(errors="replace")[:1000]
    await gateway.emit_to_user(request.path_params["user_id"], "notification", {"text": text})
    return JSONResponse({"sent": True})


app = create_app(gateway, routes=[Route("/notify/{user_id}", notify, methods=["POST"])])
