/** http(s) URLs as sources: recognised here, read by http-source.ts (loaded only for them). */

export function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}
