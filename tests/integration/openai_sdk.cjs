// The `openai` npm package against aiproxy's OpenAI-compatible API (through the edge).
// Run by tests/integration/test_openai_sdk.py with BASE_URL, API_KEY and MODEL set and
// NODE_PATH pointing at build/tools/node_modules (`make node-deps`); prints one JSON line
// the test checks. CommonJS, because NODE_PATH only applies to require().
const OpenAI = require("openai");

const { BASE_URL, API_KEY, MODEL } = process.env;
const messages = [
  { role: "system", content: "Be terse." },
  { role: "user", content: "What is backpressure?" },
];

async function errorOf(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error("expected an error");
}

async function main() {
  const client = new OpenAI({ baseURL: BASE_URL, apiKey: API_KEY, maxRetries: 0, timeout: 30000 });
  const report = {};

  const models = [];
  for await (const model of client.models.list()) models.push(model.id);
  report.models = models;

  const unary = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 6 });
  report.unary = { text: unary.choices[0].message.content, finish_reason: unary.choices[0].finish_reason };

  const stream = await client.chat.completions.create({
    model: MODEL, messages, max_tokens: 6, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  let first = null;
  for await (const chunk of stream) {
    if (first === null) first = chunk;
    if (chunk.choices.length) text += chunk.choices[0].delta.content || "";
    if (chunk.usage) usage = chunk.usage;
  }
  if (first.choices[0].delta.role !== "assistant") throw new Error("no opening role delta");
  report.stream = { text, usage };

  const errors = {};
  let err = await errorOf(client.chat.completions.create({ model: MODEL, messages, n: 2 }));
  errors["400"] = `${err.constructor.name}:${err.param}`;
  const wrong = new OpenAI({ baseURL: BASE_URL, apiKey: "sk-wrong", maxRetries: 0 });
  err = await errorOf(wrong.chat.completions.create({ model: MODEL, messages }));
  errors["401"] = err.constructor.name;
  err = await errorOf(client.chat.completions.create({ model: "gpt-nope", messages }));
  errors["404"] = `${err.constructor.name}:${err.code}`;
  report.errors = errors;

  // Retries, counted by the test in Envoy's access log (one x-request-id per call).
  const stamp = Date.now();
  const ids = { unavailable: `oa-node-503-${stamp}`, rate: `oa-node-429-${stamp}`, day: `oa-node-day-${stamp}` };
  const retrying = new OpenAI({ baseURL: BASE_URL, apiKey: API_KEY, maxRetries: 1, timeout: 30000 });
  err = await errorOf(retrying.chat.completions.create(
    { model: MODEL, messages },
    { headers: { "x-request-id": ids.unavailable, "x-fault-code": "UNAVAILABLE" } },
  ));
  report.unavailable = `${err.constructor.name}:${err.status}`;
  // 1 request per second: the first call takes the burst, the next waits retry-after-ms.
  const limited = new OpenAI({ baseURL: BASE_URL, apiKey: process.env.SLOW_KEY, maxRetries: 2, timeout: 30000 });
  await limited.chat.completions.create({ model: MODEL, messages, max_tokens: 2 });
  const late = await limited.chat.completions.create(
    { model: MODEL, messages, max_tokens: 2 }, { headers: { "x-request-id": ids.rate } },
  );
  report.rate_retried = Boolean(late.choices[0].message.content);
  // A spent daily budget: x-should-retry false, one attempt despite maxRetries.
  const broke = new OpenAI({ baseURL: BASE_URL, apiKey: process.env.BROKE_KEY, maxRetries: 2, timeout: 30000 });
  await errorOf(broke.chat.completions.create({ model: MODEL, messages, max_tokens: 5 })).catch(() => null);
  err = await errorOf(broke.chat.completions.create(
    { model: MODEL, messages, max_tokens: 5 }, { headers: { "x-request-id": ids.day } },
  ));
  report.day = `${err.constructor.name}:${err.code}`;
  report.retry_ids = ids;

  // Cancel mid-stream: abort the stream's controller after the first content chunk.
  const requestId = `oa-node-cancel-${Date.now()}`;
  const slow = await client.chat.completions.create(
    { model: MODEL, messages, max_tokens: 300, stream: true },
    { headers: { "x-request-id": requestId, "x-fault-slow-ms": "100" } },
  );
  for await (const chunk of slow) {
    if (chunk.choices.length && chunk.choices[0].delta.content) break; // break aborts
  }
  slow.controller.abort();
  report.cancel_request_id = requestId;

  console.log(JSON.stringify(report));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
