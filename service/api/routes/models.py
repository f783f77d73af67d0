"""POST /admin/models/reload: a model saved into the store while the server runs becomes servable.

The store is read again on request, not watched: a deployment knows when it has copied a model in (a
watcher would see a half-copied folder), and a reload is one cheap scan. Behind the API key like every
other route; `charlstm models --set-default` needs no reload (the default is re-read when it changes).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..deps import PoolDep
from ..native.models import ErrorResponse
from ..services import services_of

router = APIRouter(prefix="/admin/models", tags=["models"])


@router.post("/reload", responses={s: {"model": ErrorResponse} for s in (401, 500, 503)})
async def reload(request: Request, pool: PoolDep):
    """Scan the store: returns the references added and removed and every model servable now. A model gone
    from the store unloads once idle; its sessions stay and answer 409 model_mismatch until it is back."""
    result = await pool.reload()
    served = {m.ref: m.fingerprint for m in pool.catalog.models.values()}
    services = services_of(request.app)
    services.session_store.serve(served)
    if services.persistence is not None:
        services.persistence.db.models = served  # the names its file records beside the weights
    return result
