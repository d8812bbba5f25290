// @connectrpc/connect-node against aiproxy through the edge (`aiproxy envoy`), with both of
// its browser-protocol transports over HTTP/1.1: gRPC-Web (createGrpcWebTransport) and
// Connect (createConnectTransport, binary codec). No generated code: the service and its
// messages come from the descriptor set `make gen` builds (@bufbuild/protobuf's
// createFileRegistry), so nothing here can drift from proto/.
// Run by tests/integration/test_connect_clients.py with BASE_URL and DESCRIPTORS set and
// NODE_PATH pointing at build/tools/node_modules (`make node-deps`); prints one JSON line
// (the report) that the test checks. CommonJS, because NODE_PATH only applies to require().
const fs = require("node:fs");
const { createFileRegistry, fromBinary } = require("@bufbuild/protobuf");
const { FileDescriptorSetSchema } = require("@bufbuild/protobuf/wkt");
const { Code, ConnectError, createClient } = require("@connectrpc/connect");
const { createConnectTransport, createGrpcWebTransport } = require("@connectrpc/connect-node");

const { BASE_URL, DESCRIPTORS } = process.env;
const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, fs.readFileSync(DESCRIPTORS)),
);
const AgentService = registry.getService("ai.agent.v1.AgentService");
const ErrorInfo = registry.getMessage("google.rpc.ErrorInfo");
const RetryInfo = registry.getMessage("google.rpc.RetryInfo");
const enumValue = (type, name) => registry.getEnum(type).values.find((v) => v.name === name).number;

// One request per AgentService method (by its local name in connect-es).
const REQUESTS = {
  generate: { prompt: "Explain circuit breakers" },
  streamGenerate: { prompt: "Stream me a haiku" },
  chat: {
    sessionId: "connect-chat",
    messages: [{ role: enumValue("ai.agent.v1.ChatRole", "CHAT_ROLE_USER"), content: "What is backpressure?" }],
  },
  streamChat: { sessionId: "connect-stream-chat", userMessage: "And flow control?" },
  searchRag: { query: "circuit breaker half-open", topK: 3 },
  streamRagGenerate: { query: "how does envoy transcode grpc" },
  executeAgent: {
    agentType: enumValue("ai.agent.v1.AgentType", "AGENT_TYPE_ANALYSIS"),
    task: "What is 12*7?",
    tools: ["calculator"],
  },
  streamExecuteAgent: {
    agentType: enumValue("ai.agent.v1.AgentType", "AGENT_TYPE_ASSISTANT"),
    task: "Count words in hello big world",
    tools: ["word_count"],
  },
  batchGenerate: { prompts: ["one", "two"] },
};

function describe(err) {
  const error = ConnectError.from(err);
  return {
    code: Code[error.code],
    message: error.rawMessage,
    reasons: error.findDetails(ErrorInfo).map((info) => info.reason),
    retryDelayS: error.findDetails(RetryInfo).map((info) => Number(info.retryDelay?.seconds ?? 0)),
  };
}

async function callOf(client, method, request, options) {
  const kind = AgentService.methods.find((m) => m.localName === method).methodKind;
  if (kind === "unary") {
    const reply = await client[method](request, options);
    return { kind, reply: reply.$typeName, text: reply.text ?? "" };
  }
  const chunks = [];
  for await (const chunk of client[method](request, options)) chunks.push(chunk);
  const last = chunks[chunks.length - 1];
  return {
    kind,
    chunks: chunks.length,
    text: chunks.map((c) => c.delta).join(""),
    finalLast: Boolean(last && last.isFinal),
  };
}

async function outcome(promise) {
  try {
    return { ok: await promise };
  } catch (err) {
    return { error: describe(err) };
  }
}

async function run(name, transport) {
  const client = createClient(AgentService, transport);
  const report = { methods: {}, errors: {} };
  for (const [method, request] of Object.entries(REQUESTS)) {
    report.methods[method] = await outcome(callOf(client, method, request));
  }
  // Failures the agent injects (x-fault-*, `aiproxy agent --enable-faults`): before any
  // answer, and in the middle of a stream (after two chunks, which arrive first).
  const unavailable = { headers: { "x-fault-code": "UNAVAILABLE" } };
  report.errors.unary = await outcome(callOf(client, "generate", REQUESTS.generate, unavailable));
  report.errors.streamBeforeFirst = await outcome(
    callOf(client, "streamGenerate", REQUESTS.streamGenerate, unavailable),
  );
  const chunks = [];
  try {
    const midStream = { headers: { "x-fault-code": "RESOURCE_EXHAUSTED", "x-fault-after": "2" } };
    for await (const chunk of client.streamGenerate(REQUESTS.streamGenerate, midStream)) {
      chunks.push(chunk);
    }
    report.errors.midStream = { ok: { chunks: chunks.length } };
  } catch (err) {
    const last = chunks[chunks.length - 1];
    report.errors.midStream = {
      error: describe(err),
      chunks: chunks.length,
      inBand: last && last.error ? { code: last.error.code, message: last.error.message } : null,
    };
  }
  // A header the edge's guard refuses (a -bin header grpc-core could not decode), and
  // the caller's deadline, sent by the client as its protocol's own header.
  const badBin = { headers: { "x-trace-bin": "A" } };
  report.errors.guardUnary = await outcome(callOf(client, "generate", REQUESTS.generate, badBin));
  report.errors.guardStream = await outcome(
    callOf(client, "streamGenerate", REQUESTS.streamGenerate, badBin),
  );
  const slow = { headers: { "x-fault-delay-ms": "5000" }, timeoutMs: 300 };
  report.errors.deadline = await outcome(callOf(client, "generate", REQUESTS.generate, slow));
  return report;
}

async function main() {
  const options = { baseUrl: BASE_URL, httpVersion: "1.1" };
  const report = {
    grpcWeb: await run("grpc-web", createGrpcWebTransport(options)),
    connect: await run("connect", createConnectTransport({ ...options, useBinaryFormat: true })),
  };
  // Over HTTP/2 (h2c, prior knowledge) as well: one unary call, one stream, one error each.
  report.http2 = {};
  const h2 = { baseUrl: BASE_URL, httpVersion: "2" };
  for (const [name, transport] of [
    ["grpcWeb", createGrpcWebTransport(h2)],
    ["connect", createConnectTransport({ ...h2, useBinaryFormat: true })],
  ]) {
    const client = createClient(AgentService, transport);
    report.http2[name] = {
      unary: await outcome(callOf(client, "generate", REQUESTS.generate)),
      stream: await outcome(callOf(client, "streamGenerate", REQUESTS.streamGenerate)),
      error: await outcome(
        callOf(client, "generate", REQUESTS.generate, { headers: { "x-fault-code": "UNAVAILABLE" } }),
      ),
    };
  }
  // Connect's JSON codec (connect-web's default; connect-node's is binary): the edge
  // refuses it clearly (415, unimplemented) rather than hand the proxy JSON as gRPC.
  const json = createClient(
    AgentService,
    createConnectTransport({ ...options, useBinaryFormat: false }),
  );
  report.connectJson = await outcome(callOf(json, "generate", REQUESTS.generate));
  console.log(JSON.stringify(report));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
