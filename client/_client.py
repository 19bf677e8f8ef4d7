"""`AdapterHubClient`: the synchronous client."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import Any

import httpx

from client._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    RETRY_STATUSES,
    ClientSettings,
    RequestOptions,
    T,
    build_request,
    parse_model,
    retry_delay,
    should_retry_error,
    status_error,
    transport_error,
)
from client._streaming import Stream
from client.errors import AdapterHubError
from client.resources.adapters import Adapters
from client.resources.chat import Chat, Messages
from client.resources.completions import Completions
from client.resources.files import Files, TrainingData
from client.resources.fine_tuning import (
    DEFAULT_POLL_INTERVAL,
    FineTuning,
    base_model_id,
    supervised_method,
)
from client.resources.models import Models
from client.resources.tokenize import detokenize_options, tokenize_options
from client.types import (
    ChatCompletionTool,
    DetokenizeResponse,
    HealthStatus,
    TokenizeResponse,
    TrainingMethod,
)

logger = logging.getLogger("client")


class AdapterHubClient:
    """A synchronous client of an AdapterHub server.

    ```python
    from client import AdapterHubClient

    with AdapterHubClient() as hub:  # ADAPTERHUB_BASE_URL, else http://localhost:8000
        reply = hub.chat.completions.create(
            model="support-bot@prod", messages=[{"role": "user", "content": "hi"}]
        )
    ```

    Failed calls raise `client.errors` exceptions (one class per status). Connection
    failures, 429 and 503 are retried up to `max_retries` times with exponential backoff
    (honouring `Retry-After`); other errors are raised at once.
    """

    models: Models
    """`GET /v1/models`."""
    completions: Completions
    """`POST /v1/completions`."""
    chat: Chat
    """`chat.completions`: `POST /v1/chat/completions`."""
    adapters: Adapters
    """The adapter registry, `/v1/adapters`."""
    files: Files
    """Training files, `/v1/files`."""
    fine_tuning: FineTuning
    """`fine_tuning.jobs`: `/v1/fine_tuning/jobs`."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        """Connect to the server at `base_url` (else env `ADAPTERHUB_BASE_URL`, else
        `http://localhost:8000`; a trailing `/v1` is accepted), sending `Authorization:
        Bearer <api_key>` when a key is given (else env `ADAPTERHUB_API_KEY`).

        `timeout` is in seconds (or an `httpx.Timeout`; None waits forever); for a stream
        it bounds the wait for each chunk. `http_client` lets you bring your own
        `httpx.Client` (proxies, certificates); it is not closed by `close()`.
        """
        self._settings = ClientSettings.resolve(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        self.models = Models(self)
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.adapters = Adapters(self)
        self.files = Files(self)
        self.fine_tuning = FineTuning(self)

    @property
    def base_url(self) -> str:
        """The server root the client talks to."""
        return self._settings.base_url

    @property
    def api_key(self) -> str | None:
        """The key sent as a bearer token, if any."""
        return self._settings.api_key

    @property
    def timeout(self) -> httpx.Timeout:
        """The timeout of every request."""
        return self._settings.timeout

    @property
    def max_retries(self) -> int:
        """How many times a retryable failure is retried."""
        return self._settings.max_retries

    def health(self) -> HealthStatus:
        """`GET /health`: answers while the server process serves HTTP."""
        return self._request(RequestOptions("GET", "/health"), HealthStatus)

    def tokenize(
        self,
        *,
        model: str | None = None,
        prompt: str | None = None,
        messages: Messages | None = None,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        return_token_strs: bool | None = None,
    ) -> TokenizeResponse:
        """`POST /tokenize`: the token ids of `prompt` (as completions tokenize it) or of
        `messages` rendered as chat completions render them (with `add_generation_prompt`,
        `chat_template_kwargs` and `tools`), and the model's context length. `model` (default:
        the base model) must be one the server serves; `return_token_strs=True` also returns
        each token's vocabulary string."""
        options = tokenize_options(
            model=model,
            prompt=prompt,
            messages=messages,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
            return_token_strs=return_token_strs,
        )
        return self._request(options, TokenizeResponse)

    def detokenize(self, *, tokens: Sequence[int], model: str | None = None) -> DetokenizeResponse:
        """`POST /detokenize`: the text of `tokens` (special tokens included)."""
        return self._request(detokenize_options(model=model, tokens=tokens), DetokenizeResponse)

    def train(
        self,
        data: TrainingData,
        *,
        name: str,
        model: str | None = None,
        method: TrainingMethod | None = None,
        validation_data: TrainingData | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        **hyperparameters: Any,
    ) -> str:
        """Fine-tune on `data` and return the servable adapter reference (`"name@1"`).

        Uploads `data` (a JSONL path or a list of records), starts a job on `model` (default:
        the server's base model) publishing under `name`, waits for it and returns its
        `fine_tuned_model`. `method` is `"lora"` (the server's default) or `"full"`;
        `hyperparameters` are those of `FineTuningHyperparameters` (`n_epochs`, `max_steps`,
        `batch_size`, `learning_rate_multiplier`, `lora_r`, ...). Raises
        `FineTuningJobFailedError` with the server's reason when training fails, and
        `FineTuningJobTimeoutError` after `timeout` seconds.
        """
        training = self.files.create(data)
        validation = self.files.create(validation_data) if validation_data is not None else None
        job = self.fine_tuning.jobs.create(
            training_file=training.id,
            validation_file=validation.id if validation is not None else None,
            model=model or base_model_id(self.models.list()),
            suffix=name,
            seed=seed,
            method=supervised_method(method, hyperparameters),
        )
        done = self.fine_tuning.jobs.wait(job.id, timeout=timeout, poll_interval=poll_interval)
        if done.fine_tuned_model is None:
            raise AdapterHubError(f"job {done.id} succeeded but names no fine_tuned_model")
        return done.fine_tuned_model

    def close(self) -> None:
        """Close the connection pool (not an `http_client` that was passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> AdapterHubClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what the resources call --------------------------------------------------------------

    def _request(self, options: RequestOptions, cast_to: type[T]) -> T:
        """Send `options` (with retries) and parse the 2xx body as `cast_to`."""
        response = self._send(options)
        try:
            response.read()
        except httpx.TransportError as exc:
            raise transport_error(exc, response.request) from exc
        finally:
            response.close()
        return parse_model(response, cast_to)

    def _request_stream(self, options: RequestOptions, item_type: type[T]) -> Stream[T]:
        """Send `options` and return its server-sent events as a stream of `item_type`."""
        return Stream(self._send(options), item_type)

    @contextmanager
    def _request_raw(self, options: RequestOptions) -> Iterator[httpx.Response]:
        """The 2xx response with its body still unread (downloads stream it to disk)."""
        response = self._send(options)
        try:
            yield response
        except httpx.TransportError as exc:
            raise transport_error(exc, response.request) from exc
        finally:
            response.close()

    def _send(self, options: RequestOptions) -> httpx.Response:
        """The first 2xx response to `options`, unread; retries what may be retried and
        raises the mapped error for the rest."""
        attempt = 0
        while True:
            failure: httpx.TransportError | None = None
            with ExitStack() as stack:
                request = build_request(self._http, self._settings, options, stack)
                try:
                    response = self._http.send(request, stream=True)
                except httpx.TransportError as exc:
                    failure = exc
            retry = attempt < self.max_retries
            if failure is not None:
                if retry and should_retry_error(failure, options.method):
                    self._pause(options, attempt, None, repr(failure))
                    attempt += 1
                    continue
                raise transport_error(failure, request) from failure
            if response.is_success:
                return response
            try:
                response.read()
            except httpx.TransportError as exc:
                raise transport_error(exc, request) from exc
            finally:
                response.close()
            if retry and response.status_code in RETRY_STATUSES:
                self._pause(options, attempt, response, str(response.status_code))
                attempt += 1
                continue
            raise status_error(response)

    def _pause(
        self,
        options: RequestOptions,
        attempt: int,
        response: httpx.Response | None,
        reason: str,
    ) -> None:
        delay = retry_delay(attempt, response)
        logger.info(
            "retrying %s %s in %.2f s (retry %d of %d) after %s",
            options.method,
            options.path,
            delay,
            attempt + 1,
            self.max_retries,
            reason,
        )
        time.sleep(delay)
