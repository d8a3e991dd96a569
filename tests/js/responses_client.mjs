// The openai npm package against sluice's Responses API: a background stream, cut after a few
// events, resumed with `starting_after`, then the stored response. Prints what it saw as JSON.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.SLUICE_BASE_URL, apiKey: "unused" });

const stream = await client.responses.create({
  model: "synthetic",
  input: "hello from node",
  background: true,
  stream: true,
});
const seen = [];
for await (const event of stream) {
  seen.push(event);
  if (seen.length === 7) break;
}
const id = seen[0].response.id;
const rest = await client.responses.retrieve(id, {
  stream: true,
  starting_after: seen.at(-1).sequence_number,
});
for await (const event of rest) seen.push(event);
const stored = await client.responses.retrieve(id);
console.log(
  JSON.stringify({
    sequence: seen.map((e) => e.sequence_number),
    last: seen.at(-1).type,
    text: seen
      .filter((e) => e.type === "response.output_text.delta")
      .map((e) => e.delta)
      .join(""),
    stored: { status: stored.status, output_text: stored.output_text },
  }),
);
